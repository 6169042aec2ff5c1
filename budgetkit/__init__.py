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
    from .budgets import (
        Alert,
        Budget,
        BudgetLevels,
        BudgetStatus,
        WebhookSink,
        load_budgets,
        model_token_budgets,
        token_ladder_budgets,
    )
    from .cache import CacheHit, MiniLMEmbedder, ResponseCache
    from .engine import Engine
    from .errors import (
        ApprovalRequired,
        BudgetExceeded,
        BudgetkitError,
        CatalogError,
        ConfigurationError,
        ContextWindowExceeded,
        StoreUnavailable,
        UnknownModelError,
    )
    from .fitting import FitResult, compress_prompt, fit_documents, fit_messages
    from .ledger import UsageRow
    from .pricing import (
        ModelPrice,
        PriceCatalog,
        count_message_tokens,
        count_tokens,
        count_tool_tokens,
        default_catalog,
        estimate_cost,
    )
    from .reports import (
        budget_report,
        cost_analysis,
        cost_series,
        detect_anomalies,
        export_usage,
        forecast,
        summarize,
        what_if,
    )
    from .routing import Cascade, Fallback, MinLength, RouteDecision, Router, ValidJSON


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
