"""Which model should answer: the tiered router and its learned scorer, the cascade with
its acceptability checks, fallback on provider errors, and the framework-free parts of
routed wrappers.

Built on :mod:`budgetkit.pricing`, :mod:`budgetkit.ledger` (fitted scorers and cascade
verdicts are stored there) and :mod:`budgetkit.fitting`.
"""

from __future__ import annotations

from ._cascade import Attempt as Attempt
from ._cascade import Cascade as Cascade
from ._cascade import CascadeResult as CascadeResult
from ._cascade import Completion as Completion
from ._checks import Check as Check
from ._checks import MatchesRegex as MatchesRegex
from ._checks import MinLength as MinLength
from ._checks import RequiredElements as RequiredElements
from ._checks import ScoreAtLeast as ScoreAtLeast
from ._checks import ValidJSON as ValidJSON
from ._model_checks import Agreement as Agreement
from ._model_checks import ScorerCheck as ScorerCheck
from ._model_checks import Verifier as Verifier
from ._model_checks import final_answer as final_answer
from ._cascade import asettle_completion as asettle_completion
from ._cascade import is_metered_call as is_metered_call
from ._cascade import metered_call as metered_call
from ._cascade import settle_completion as settle_completion
from ._fallback import Fallback as Fallback
from ._fallback import FallbackAttempt as FallbackAttempt
from ._fallback import is_context_length_error as is_context_length_error
from ._fallback import is_rate_limit as is_rate_limit
from ._fallback import is_server_error as is_server_error
from ._fallback import is_timeout as is_timeout
from ._fallback import is_transient as is_transient
from ._routed import check_routed_models as check_routed_models
from ._routed import explain_fit as explain_fit
from ._routed import fallback_reason as fallback_reason
from ._routed import fit_summary as fit_summary
from ._routed import largest_window_decision as largest_window_decision
from ._routed import routing_catalog as routing_catalog
from ._router import TASK_LEVELS as TASK_LEVELS
from ._router import RouteDecision as RouteDecision
from ._router import Router as Router
from ._prompt import complexity_score as complexity_score
from ._prompt import prompt_text as prompt_text
from ._features import PromptFeatures as PromptFeatures
from ._features import prompt_features as prompt_features
from ._scorer import Scorer as Scorer
from ._scorer import default_scorer as default_scorer
from ._share import ShareTracker as ShareTracker

__all__ = ['Router', 'RouteDecision', 'TASK_LEVELS', 'complexity_score', 'Scorer',
           'default_scorer', 'PromptFeatures', 'prompt_features', 'prompt_text', 'Completion',
           'Check', 'MinLength', 'RequiredElements', 'MatchesRegex', 'ValidJSON',
           'ScoreAtLeast', 'Agreement', 'ScorerCheck', 'Verifier', 'final_answer',
           'Attempt', 'CascadeResult', 'Cascade', 'settle_completion',
           'asettle_completion', 'metered_call', 'is_metered_call', 'Fallback',
           'FallbackAttempt', 'is_rate_limit', 'is_timeout', 'is_server_error',
           'is_transient', 'is_context_length_error', 'check_routed_models',
           'routing_catalog', 'largest_window_decision', 'fallback_reason', 'fit_summary',
           'explain_fit', 'ShareTracker']
