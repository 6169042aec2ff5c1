"""Framework-free pieces of the routed-model wrappers (LangChain and LlamaIndex).

``langchain_budgetkit.RoutedChatModel`` and ``llama_index.llms.budgetkit.RoutedLLM`` differ
in how they call models, but check their configuration, pick a model when no routed
window takes the prompt, and describe a context fit the same way; that logic lives here
once so both wrappers write the same route reasons and usage-row metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from budgetkit.errors import ConfigurationError, ContextWindowExceeded
from budgetkit.fitting import FitReport
from budgetkit.pricing import PriceCatalog, default_catalog

from ._router import RouteDecision

__all__ = ["check_routed_models", "routing_catalog", "largest_window_decision",
           "fallback_reason", "fit_summary", "explain_fit"]


def check_routed_models(models: Mapping[str, Any], *, router: Any, cascade: Any,
                        fallback: Any, default_model: str | None,
                        reserve_output: int | None) -> None:
    """Raise ConfigurationError when the wrapper's parts name models ``models`` lacks.

    ``models`` must not be empty (the caller checks that first, with its own wording).
    """
    if router is not None and cascade is not None:
        raise ConfigurationError("give a router or a cascade, not both")
    if reserve_output is not None and (isinstance(reserve_output, bool) or reserve_output < 0):
        raise ConfigurationError(f"reserve_output must be an int >= 0, got {reserve_output!r}")
    needed: dict[str, Sequence[str]] = {
        "router": getattr(router, "models", ()),
        "cascade": getattr(cascade, "models", ()),
        "fallback": getattr(fallback, "models", ()),
        "default_model": [default_model] if default_model else []}
    for owner, names in needed.items():
        missing = [name for name in names if name not in models]
        if missing:
            raise ConfigurationError(
                f"{owner} names model(s) {', '.join(missing)} that models= does not "
                f"provide; models: {', '.join(models)}")


def routing_catalog(router: Any, engine: Any) -> PriceCatalog:
    """The catalog windows are read from: the router's, else the engine's, else the default."""
    for owner in (router, engine):
        catalog: PriceCatalog | None = getattr(owner, "catalog", None)
        if catalog is not None:
            return catalog
    return default_catalog()


def largest_window_decision(router: Any, catalog: PriceCatalog, required: str | None,
                            exc: ContextWindowExceeded) -> RouteDecision:
    """No routed model takes the whole prompt: the required model, else the one with the
    largest window (cheapest tier first among equals); the caller fits the prompt to it."""

    def window(name: str) -> int:
        price = catalog.get(name)
        return price.context_window or price.max_input_tokens

    if required is not None:
        reason = (f"required model {required}; {exc.tokens} tokens (prompt + reserved "
                  f"output) exceed its window of {window(required)}")
        return RouteDecision(required, router.tier_of(required), (reason,))
    model = max(router.models, key=window)
    reason = (f"no routed model's window takes {exc.tokens} tokens (prompt + reserved "
              f"output) -> {model}, the largest window ({window(model)})")
    return RouteDecision(model, router.tier_of(model), (reason,))


def fallback_reason(decision: RouteDecision, name: str) -> str:
    """The decision's reason, plus the fallback when ``name`` is not the routed model."""
    if name == decision.model:
        return decision.reason
    return f"{decision.reason}; fallback from {decision.model} to {name}"


def fit_summary(model: str, report: FitReport) -> dict[str, Any]:
    """What the usage row and the answer's marker record about a context fit."""
    return {"model": model, "tokens_before": report.tokens_before,
            "tokens_after": report.tokens_after, "limit": report.limit,
            "dropped": report.dropped, "truncated": report.truncated}


def explain_fit(reason: str, model: str, report: FitReport) -> str:
    """``reason`` plus one clause saying what fitting the prompt to ``model`` did."""
    cut = ", newest user message cut in the middle" if report.truncated else ""
    return (f"{reason}; context fit: {report.tokens_before} -> {report.tokens_after} "
            f"tokens for {model} (limit {report.limit}), {report.dropped} "
            f"messages dropped{cut}")
