"""budgetkit: see where LLM money goes, bound it, and spend less.

The names below are what a user of the README needs. Each domain has its own public
package with the rest of its names: :mod:`budgetkit.pricing`, :mod:`budgetkit.ledger`,
:mod:`budgetkit.budgets`, :mod:`budgetkit.cache`, :mod:`budgetkit.routing`,
:mod:`budgetkit.fitting`, :mod:`budgetkit.reports`, :mod:`budgetkit.engine`,
:mod:`budgetkit.server`, :mod:`budgetkit.testing`. ``docs/architecture.md`` draws the layers.

Names are imported lazily, so ``import budgetkit`` stays fast: pricing a call or counting
tokens never loads the database layer, and nothing here loads LangChain or LlamaIndex.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

# public name -> the public package that defines it
_EXPORTS: dict[str, str] = {
    # errors: one tree, every error budgetkit raises is a BudgetkitError
    "BudgetkitError": "errors",
    "ConfigurationError": "errors",
    "CatalogError": "errors",
    "UnknownModelError": "errors",
    "ContextWindowExceeded": "errors",
    "BudgetExceeded": "errors",
    "ApprovalRequired": "errors",
    "StoreUnavailable": "errors",
    # what a token costs, how many tokens a text is
    "PriceCatalog": "pricing",
    "ModelPrice": "pricing",
    "default_catalog": "pricing",
    "estimate_cost": "pricing",
    "count_tokens": "pricing",
    "count_message_tokens": "pricing",
    "count_tool_tokens": "pricing",
    # the engine and what it writes
    "Engine": "engine",
    "UsageRow": "ledger",
    # budgets
    "Budget": "budgets",
    "BudgetLevels": "budgets",
    "BudgetStatus": "budgets",
    "Alert": "budgets",
    "WebhookSink": "budgets",
    "load_budgets": "budgets",
    "token_ladder_budgets": "budgets",
    "model_token_budgets": "budgets",
    # response cache
    "ResponseCache": "cache",
    "CacheHit": "cache",
    "MiniLMEmbedder": "cache",
    # routing, cascade, fallback
    "Router": "routing",
    "RouteDecision": "routing",
    "Cascade": "routing",
    "MinLength": "routing",
    "ValidJSON": "routing",
    "Fallback": "routing",
    # context fitting
    "fit_messages": "fitting",
    "fit_documents": "fitting",
    "compress_prompt": "fitting",
    "FitResult": "fitting",
    # reports
    "summarize": "reports",
    "cost_series": "reports",
    "cost_analysis": "reports",
    "what_if": "reports",
    "forecast": "reports",
    "detect_anomalies": "reports",
    "budget_report": "reports",
    "export_usage": "reports",
}

# Names the top level exported before the packages existed: they keep working, with a
# warning that says where they live now.
_MOVED: dict[str, str] = {
    "ModelBudget": "pricing", "get_generation_budget": "pricing",
    "get_embedding_budget": "pricing", "chunk_text": "pricing", "is_exact": "pricing",
    "FitReport": "fitting", "CompressionReport": "fitting", "CompressedPrompt": "fitting",
    "DEFAULT_PHRASES": "fitting", "prompt_token_limit": "fitting",
    "Ticket": "ledger", "UsageRecord": "ledger",
    "AdmissionLane": "budgets", "LaneReservation": "budgets", "Lanes": "budgets",
    "Approval": "budgets", "LoggingSink": "budgets", "seed_budgets": "budgets",
    "CacheStats": "cache", "as_embedder": "cache",
    "UsageSummary": "reports", "CostAnalysis": "reports", "summarize_many": "reports",
    "allocate_costs": "reports", "periodic_report": "reports",
    "CascadeResult": "routing", "Completion": "routing", "RequiredElements": "routing",
    "MatchesRegex": "routing", "ScoreAtLeast": "routing", "Attempt": "routing",
    "FallbackAttempt": "routing", "is_transient": "routing", "is_rate_limit": "routing",
    "is_timeout": "routing", "is_server_error": "routing", "is_context_length_error": "routing",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    # `X as X`: explicit re-exports, so type checkers see the lazily loaded names as
    # budgetkit's own (__all__ is computed, which they cannot read).
    from .budgets import Alert as Alert
    from .budgets import Budget as Budget
    from .budgets import BudgetLevels as BudgetLevels
    from .budgets import BudgetStatus as BudgetStatus
    from .budgets import WebhookSink as WebhookSink
    from .budgets import load_budgets as load_budgets
    from .budgets import model_token_budgets as model_token_budgets
    from .budgets import token_ladder_budgets as token_ladder_budgets
    from .cache import CacheHit as CacheHit
    from .cache import MiniLMEmbedder as MiniLMEmbedder
    from .cache import ResponseCache as ResponseCache
    from .engine import Engine as Engine
    from .errors import ApprovalRequired as ApprovalRequired
    from .errors import BudgetExceeded as BudgetExceeded
    from .errors import BudgetkitError as BudgetkitError
    from .errors import CatalogError as CatalogError
    from .errors import ConfigurationError as ConfigurationError
    from .errors import ContextWindowExceeded as ContextWindowExceeded
    from .errors import StoreUnavailable as StoreUnavailable
    from .errors import UnknownModelError as UnknownModelError
    from .fitting import FitResult as FitResult
    from .fitting import compress_prompt as compress_prompt
    from .fitting import fit_documents as fit_documents
    from .fitting import fit_messages as fit_messages
    from .ledger import UsageRow as UsageRow
    from .pricing import ModelPrice as ModelPrice
    from .pricing import PriceCatalog as PriceCatalog
    from .pricing import count_message_tokens as count_message_tokens
    from .pricing import count_tokens as count_tokens
    from .pricing import count_tool_tokens as count_tool_tokens
    from .pricing import default_catalog as default_catalog
    from .pricing import estimate_cost as estimate_cost
    from .reports import budget_report as budget_report
    from .reports import cost_analysis as cost_analysis
    from .reports import cost_series as cost_series
    from .reports import detect_anomalies as detect_anomalies
    from .reports import export_usage as export_usage
    from .reports import forecast as forecast
    from .reports import summarize as summarize
    from .reports import what_if as what_if
    from .routing import Cascade as Cascade
    from .routing import Fallback as Fallback
    from .routing import MinLength as MinLength
    from .routing import RouteDecision as RouteDecision
    from .routing import Router as Router
    from .routing import ValidJSON as ValidJSON


def __getattr__(name: str) -> Any:
    package = _EXPORTS.get(name)
    if package is None:
        package = _MOVED.get(name)
        if package is None:
            raise AttributeError(f"module 'budgetkit' has no attribute {name!r}")
        warnings.warn(f"budgetkit.{name} moved to budgetkit.{package}.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"budgetkit.{package}"), name)
    value = getattr(importlib.import_module(f"budgetkit.{package}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
