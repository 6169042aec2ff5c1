"""budgetkit for LangChain: callback handlers (sync and async) that meter and bound every
call, a routed chat model, a response cache, metered embeddings and message fitting."""

from __future__ import annotations

from ._cache import BudgetkitCache as BudgetkitCache
from ._callback import BudgetkitCallbackHandler as BudgetkitCallbackHandler
from ._callback import get_budgetkit_callback as get_budgetkit_callback
from ._callback_async import AsyncBudgetkitCallbackHandler as AsyncBudgetkitCallbackHandler
from ._embeddings import MeteredEmbeddings as MeteredEmbeddings
from ._fitting import fit_messages as fit_messages
from ._routed import RoutedChatModel as RoutedChatModel

__version__ = "0.1.0"
__all__ = ["AsyncBudgetkitCallbackHandler", "BudgetkitCache", "BudgetkitCallbackHandler",
           "MeteredEmbeddings", "RoutedChatModel", "fit_messages", "get_budgetkit_callback",
           "__version__"]
