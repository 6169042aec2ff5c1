"""Make a prompt fit a window: chat history and document fitting, prompt compression.

Pure computation over :mod:`budgetkit.pricing`.
"""

from __future__ import annotations

from ._fitter import DEFAULT_PHRASES as DEFAULT_PHRASES
from ._fitter import DEFAULT_RESERVE_CAP as DEFAULT_RESERVE_CAP
from ._fitter import CompressedPrompt as CompressedPrompt
from ._fitter import CompressionReport as CompressionReport
from ._fitter import FitReport as FitReport
from ._fitter import FitResult as FitResult
from ._fitter import LazyOpenAIMessages as LazyOpenAIMessages
from ._fitter import OnOverflow as OnOverflow
from ._fitter import compress_prompt as compress_prompt
from ._fitter import fit_documents as fit_documents
from ._fitter import fit_message_sequence as fit_message_sequence
from ._fitter import fit_messages as fit_messages
from ._fitter import prompt_token_limit as prompt_token_limit

__all__ = ['FitReport', 'FitResult', 'CompressionReport', 'CompressedPrompt',
           'DEFAULT_PHRASES', 'DEFAULT_RESERVE_CAP', 'fit_messages', 'fit_documents',
           'compress_prompt', 'prompt_token_limit', 'fit_message_sequence',
           'LazyOpenAIMessages', 'OnOverflow']
