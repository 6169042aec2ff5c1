"""budgetkit: see where LLM money goes, bound it, and spend less.

Public names are imported lazily, so ``import budgetkit`` stays fast: pricing a call or
counting tokens never loads the database layer, and nothing here loads LangChain or
LlamaIndex.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> private module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "BudgetkitError": "_errors",
    "ConfigurationError": "_errors",
    "CatalogError": "_errors",
    "UnknownModelError": "_errors",
    "ContextWindowExceeded": "_errors",
    "BudgetExceeded": "_errors",
    "ApprovalRequired": "_errors",
    "StoreUnavailable": "_errors",
    # pricing
    "ModelPrice": "_catalog",
    "ModelBudget": "_catalog",
    "PriceCatalog": "_catalog",
    "default_catalog": "_catalog",
    "estimate_cost": "_catalog",
    "get_generation_budget": "_catalog",
    "get_embedding_budget": "_catalog",
    # tokens
    "count_tokens": "_tokens",
    "count_message_tokens": "_tokens",
    "count_tool_tokens": "_tokens",
    "chunk_text": "_tokens",
    "is_exact": "_tokens",
    # context fitting
    "fit_messages": "_fitter",
    "fit_documents": "_fitter",
    "compress_prompt": "_fitter",
    "prompt_token_limit": "_fitter",
    "FitReport": "_fitter",
    "FitResult": "_fitter",
    "CompressionReport": "_fitter",
    "CompressedPrompt": "_fitter",
    "DEFAULT_PHRASES": "_fitter",
    # engine and ledger
    "Engine": "_engine",
    "Ticket": "_engine",
    "UsageRecord": "_engine",
    "AdmissionLane": "_budget_lane",
    "LaneReservation": "_budget_lane",
    "Lanes": "_budget_lane",
    "UsageRow": "_tables",
    # response cache
    "ResponseCache": "_cache",
    "CacheHit": "_cache",
    "CacheStats": "_cache",
    "MiniLMEmbedder": "_embedders",
    "as_embedder": "_embedders",
    # budgets
    "Budget": "_budgets",
    "BudgetLevels": "_budgets",
    "load_budgets": "_budgets",
    "BudgetStatus": "_budget_status",
    "Approval": "_budget_status",
    "Alert": "_alerts",
    "LoggingSink": "_alerts",
    "WebhookSink": "_alerts",
    "token_ladder_budgets": "_budget_presets",
    "model_token_budgets": "_budget_presets",
    "seed_budgets": "_budget_presets",
    # reports
    "UsageSummary": "_reports",
    "CostAnalysis": "_reports",
    "summarize": "_reports",
    "summarize_many": "_reports",
    "cost_series": "_reports",
    "cost_analysis": "_reports",
    "allocate_costs": "_reports",
    "what_if": "_reports",
    "budget_report": "_budget_reports",
    "periodic_report": "_budget_reports",
    "forecast": "_forecast",
    "detect_anomalies": "_forecast",
    "export_usage": "_export",
    # routing, cascade, fallback
    "Router": "_router", "RouteDecision": "_router",
    "Cascade": "_cascade", "CascadeResult": "_cascade", "Completion": "_cascade",
    "MinLength": "_cascade", "RequiredElements": "_cascade", "MatchesRegex": "_cascade",
    "ValidJSON": "_cascade", "ScoreAtLeast": "_cascade",
    "Attempt": "_cascade",
    "Fallback": "_fallback", "FallbackAttempt": "_fallback", "is_transient": "_fallback",
    "is_rate_limit": "_fallback", "is_timeout": "_fallback", "is_server_error": "_fallback",
    "is_context_length_error": "_fallback",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from ._catalog import (ModelBudget, ModelPrice, PriceCatalog, default_catalog,
                           estimate_cost, get_embedding_budget, get_generation_budget)
    from ._engine import Engine, Ticket, UsageRecord
    from ._budget_lane import AdmissionLane, LaneReservation, Lanes
    from ._tables import UsageRow
    from ._cache import CacheHit, CacheStats, ResponseCache
    from ._embedders import MiniLMEmbedder, as_embedder
    from ._alerts import Alert, LoggingSink, WebhookSink
    from ._budget_status import Approval, BudgetStatus
    from ._budget_presets import model_token_budgets, seed_budgets, token_ladder_budgets
    from ._budgets import Budget, BudgetLevels, load_budgets
    from ._reports import (CostAnalysis, UsageSummary, allocate_costs, cost_analysis,
                           cost_series, summarize, summarize_many, what_if)
    from ._budget_reports import budget_report, periodic_report
    from ._forecast import detect_anomalies, forecast
    from ._export import export_usage
    from ._router import RouteDecision, Router
    from ._cascade import (Attempt, Cascade, CascadeResult, Completion, MatchesRegex,
                           MinLength, RequiredElements, ScoreAtLeast, ValidJSON)
    from ._fallback import (Fallback, FallbackAttempt, is_context_length_error,
                            is_rate_limit, is_server_error, is_timeout, is_transient)
    from ._errors import (ApprovalRequired, BudgetExceeded, BudgetkitError, CatalogError,
                          ConfigurationError, ContextWindowExceeded, StoreUnavailable,
                          UnknownModelError)
    from ._tokens import (chunk_text, count_message_tokens, count_tokens, count_tool_tokens,
                          is_exact)
    from ._fitter import (DEFAULT_PHRASES, CompressedPrompt, CompressionReport, FitReport,
                          FitResult, compress_prompt, fit_documents, fit_messages,
                          prompt_token_limit)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'budgetkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"budgetkit.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
