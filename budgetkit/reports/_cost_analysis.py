"""Cost analysis with data-driven recommendations, and what-if re-pricing.

Split from :mod:`budgetkit.reports._reports` (which re-exports these names): the summaries come
from there (rollup-backed where possible); the repeated-prompt and short-prompt checks
need per-row conditions, so they read the ledger with their own ``GROUP BY`` queries.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, select

from budgetkit.pricing import PriceCatalog, nanos_to_usd

from ._budgets import budget_rows
from ._reports import (
    USAGE,
    Period,
    UsageGroup,
    UsageSummary,
    _filters,
    _Source,
    as_source,
    plan_columns,
    run_query,
    summarize,
    summarize_many,
)

__all__ = ["Recommendation", "CostAnalysis", "WhatIf", "cost_analysis", "what_if"]

# -- cost analysis and recommendations -----------------------------------------------
@dataclass(frozen=True)
class Recommendation:
    """Advice derived from the data, with the figure that triggered it."""

    kind: str
    message: str
    metric: str
    value: float
    threshold: float
    potential_savings_usd: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "metric": self.metric,
                "value": self.value, "threshold": self.threshold,
                "potential_savings_usd": self.potential_savings_usd}


@dataclass(frozen=True)
class CostAnalysis:
    """Cost per token and per operation/model, and what to do about it."""

    period: Period
    totals: UsageGroup
    by_operation: list[UsageGroup]
    by_model: list[UsageGroup]
    recommendations: list[Recommendation]

    def to_dict(self) -> dict[str, Any]:
        def costs(groups: list[UsageGroup], dim: str) -> dict[str, Any]:
            return {str(g.key[dim]): {"total_cost": g.cost, "total_tokens": g.total_tokens,
                                      "operation_count": g.calls,
                                      "cost_per_operation": g.cost_per_call,
                                      "cost_per_token": g.cost_per_token}
                    for g in groups}
        return {"period": self.period.to_dict(), "total_cost_usd": self.totals.cost,
                "total_tokens": self.totals.total_tokens,
                "cost_per_token": self.totals.cost_per_token,
                "saved_usd": self.totals.saved,
                "operation_costs": costs(self.by_operation, "operation_type"),
                "model_costs": costs(self.by_model, "model"),
                "recommendations": [r.message for r in self.recommendations],
                "recommendation_details": [r.to_dict() for r in self.recommendations]}


# Thresholds of the recommendations (module constants, so a reader sees them in one place).
EMBEDDING_SHARE = 0.30  # embedding spend above 30 % of the total
REPEAT_SHARE = 0.10  # more than 10 % of paid calls repeat an earlier prompt exactly
SHORT_PROMPT_TOKENS = 500  # "short simple prompt": under 500 input and 200 output tokens
SHORT_OUTPUT_TOKENS = 200
SHORT_CALL_SHARE = 0.50  # most of an expensive model's calls are short
ROUTE_DOWN_RATIO = 5.0  # a same-provider model at least 5x cheaper exists
BUDGET_NEAR = 80.0  # a budget window at 80 % or more of its limit
ERROR_SHARE = 0.05


def cost_analysis(source: Any, *, days: int | None = None, start_date: Any = None,
                  end_date: Any = None, now: dt.datetime | None = None,
                  **filters: Any) -> CostAnalysis:
    """The Token Usage Tracking seed's cost analysis, with recommendations.

    Each recommendation names the figure behind it: embedding share of spend, share of
    calls repeating an earlier prompt, short prompts sent to a model a cheaper same-provider
    model could answer, budgets near their limit, error rate.
    """
    src = as_source(source, now=now)
    by_op, by_model = summarize_many(src, ["operation_type", "model"], days=days,
                                     start_date=start_date, end_date=end_date, **filters)
    recs: list[Recommendation] = []
    totals = by_op.totals
    if totals.cost_nanos > 0:
        recs += _embedding_advice(src, by_model, totals)
        recs += _caching_advice(src, by_op.period, filters)
        recs += _routing_advice(src, by_op.period, filters)
    if totals.calls and totals.errors / totals.calls > ERROR_SHARE:
        share = totals.errors / totals.calls
        recs.append(Recommendation(
            "errors", f"{totals.errors} of {totals.calls} calls ({share:.0%}) failed - check "
            "provider errors and retry settings; failed calls can still be billed",
            "error_share", round(share, 4), ERROR_SHARE))
    if not filters.get("user_id"):
        recs += _budget_advice(src)
    return CostAnalysis(period=by_op.period, totals=totals, by_operation=by_op.groups,
                        by_model=by_model.groups, recommendations=recs)


def _embedding_advice(src: _Source, by_model: UsageSummary,
                      totals: UsageGroup) -> list[Recommendation]:
    embedding = 0
    for group in by_model.groups:
        price = src.catalog.resolve(str(group.key["model"]))
        if price is not None and price.mode == "embedding":
            embedding += group.cost_nanos
    share = embedding / totals.cost_nanos
    if share <= EMBEDDING_SHARE:
        return []
    return [Recommendation(
        "embedding_share", f"High embedding costs: {share:.0%} of spend "
        f"(${nanos_to_usd(embedding):.4f}) - consider optimizing chunk sizes and "
        "not re-embedding unchanged documents", "embedding_cost_share", round(share, 4),
        EMBEDDING_SHARE)]


def _caching_advice(src: _Source, period: Period,
                    filters: Mapping[str, Any]) -> list[Recommendation]:
    c = plan_columns(src, period, filters)
    # paid calls whose prompt is known (hashed); embeddings recorded without one don't count
    where = _filters(src, period, filters, c) + [c.status == "ok", c.prompt_hash.is_not(None)]
    # one pass: per prompt, its calls and what the calls after the first cost
    per_prompt = (select(func.count().label("n"),
                         (func.sum(c.cost_nanos) - func.min(c.cost_nanos)).label("extra_cost"))
                  .select_from(USAGE)
                  .where(and_(*where))
                  .group_by(c.prompt_hash).subquery())
    paid, extra, extra_cost = run_query(src, select(
        func.coalesce(func.sum(per_prompt.c.n), 0),
        func.coalesce(func.sum(per_prompt.c.n - 1), 0),
        func.coalesce(func.sum(per_prompt.c.extra_cost), 0)))[0]
    paid = int(paid)
    if not paid or int(extra) / paid <= REPEAT_SHARE:
        return []
    share = int(extra) / paid
    saving = nanos_to_usd(int(extra_cost))
    return [Recommendation(
        "caching", f"Consider implementing caching for frequent queries: {int(extra)} of "
        f"{paid} paid calls ({share:.0%}) repeated an earlier prompt exactly, costing "
        f"${saving:.4f}", "repeated_prompt_share", round(share, 4), REPEAT_SHARE,
        potential_savings_usd=saving)]


def _routing_advice(src: _Source, period: Period,
                    filters: Mapping[str, Any]) -> list[Recommendation]:
    c = plan_columns(src, period, filters)
    short = and_(c.input_tokens < SHORT_PROMPT_TOKENS, c.output_tokens < SHORT_OUTPUT_TOKENS)
    query = (select(c.model.label("model"), func.count().label("calls"),
                    func.sum(case((short, 1), else_=0)).label("short_calls"),
                    func.sum(case((short, c.input_tokens), else_=0)).label("short_in"),
                    func.sum(case((short, c.output_tokens), else_=0)).label("short_out"),
                    func.sum(case((short, c.cost_nanos), else_=0)).label("short_cost"))
             .select_from(USAGE)
             .where(and_(*_filters(src, period, filters, c), c.status == "ok"))
             .group_by(c.model))
    recs = []
    for row in run_query(src, query):
        model, calls, short_calls = row.model, int(row.calls), int(row.short_calls or 0)
        price = src.catalog.resolve(model)
        if price is None or price.mode != "chat" or not calls:
            continue
        if short_calls / calls < SHORT_CALL_SHARE or not row.short_cost:
            continue
        cheaper = _cheaper_model(src.catalog, price)
        if cheaper is None:
            continue
        repriced = cheaper.cost_nanos(int(row.short_in), int(row.short_out))
        actual = int(row.short_cost)
        if repriced * ROUTE_DOWN_RATIO > actual:
            continue
        share = short_calls / calls
        recs.append(Recommendation(
            "route_down", f"{model} answered {short_calls} short prompts ({share:.0%} of its "
            f"calls, under {SHORT_PROMPT_TOKENS} input tokens) for ${nanos_to_usd(actual):.4f}; "
            f"{cheaper.name} would have cost ${nanos_to_usd(repriced):.4f} - route simple "
            "requests to a cheaper model", "short_call_share", round(share, 4),
            SHORT_CALL_SHARE, potential_savings_usd=nanos_to_usd(actual - repriced)))
    return recs


def _cheaper_model(catalog: PriceCatalog, price: Any) -> Any:
    """The cheapest chat model of the same provider (by input + output price), if cheaper."""
    best = None
    for candidate in catalog:
        if candidate.mode != "chat" or candidate.provider != price.provider:
            continue
        if candidate.input_picos + candidate.output_picos <= 0:
            continue  # free/unpriced entries are not a recommendation
        if best is None or (candidate.input_picos + candidate.output_picos
                            < best.input_picos + best.output_picos):
            best = candidate
    if best is None or best.name == price.name:
        return None
    return best


def _budget_advice(src: _Source) -> list[Recommendation]:
    recs = []
    for status in budget_rows(src.engine):
        percent = status.get("percent")
        if percent is None or percent < BUDGET_NEAR:
            continue
        used, limit = status.get("used") or 0, status.get("limit") or 0
        amounts = (f"${used:.4f} of ${limit:.4f}" if status.get("unit") == "usd"
                   else f"{used:,.0f} of {limit:,.0f} tokens")
        who = f" for {status['scope']}" if status.get("scope_key") else ""
        recs.append(Recommendation(
            "budget", f"Budget {status.get('name')!r}{who} is at {percent:.0f}% of its "
            f"{status.get('period', '')} limit ({amounts}) - raise it, or route and cache more",
            "budget_percent", round(float(percent), 2), BUDGET_NEAR))
    return recs



@dataclass(frozen=True)
class WhatIf:
    """Past usage re-priced as if ``target`` had answered it."""

    target: str
    period: Period
    rows: list[dict[str, Any]]
    actual_nanos: int
    repriced_nanos: int
    skipped_models: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "period": self.period.to_dict(), "models": self.rows,
                "actual_cost_usd": nanos_to_usd(self.actual_nanos),
                "repriced_cost_usd": nanos_to_usd(self.repriced_nanos),
                "difference_usd": nanos_to_usd(self.repriced_nanos - self.actual_nanos),
                "skipped_models": self.skipped_models}


def what_if(source: Any, target: str, *, days: int | None = None, start_date: Any = None,
            end_date: Any = None, now: dt.datetime | None = None,
            **filters: Any) -> WhatIf:
    """Re-price the period's paid calls with ``target``'s catalog price.

    Token counts are kept as recorded (a different model would tokenize a little
    differently). Calls of a different mode (embeddings when the target is a chat model)
    and models the catalog does not know are left out and listed in ``skipped_models``.
    """
    src = as_source(source, now=now)
    target_price = src.catalog.get(target)  # UnknownModelError names the model
    period = Period.resolve(days=days, start_date=start_date, end_date=end_date, now=src.now)
    # paid calls per model, from the rollup where it answers (model x status)
    paid: dict[str, list[UsageGroup]] = {}
    for group in summarize(src, group_by=("model", "status"), period=period, **filters).groups:
        if group.key["status"] in ("ok", "error"):
            paid.setdefault(group.key["model"], []).append(group)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    actual_total = repriced_total = 0
    for model, groups in paid.items():
        totals = UsageGroup.merge({"model": model}, groups)
        price = src.catalog.resolve(model)
        if price is None or price.mode != target_price.mode:
            skipped.append(model)
            continue
        actual = totals.cost_nanos
        repriced = target_price.cost_nanos(totals.input_tokens, totals.output_tokens,
                                           cached_input_tokens=totals.cached_input_tokens)
        actual_total += actual
        repriced_total += repriced
        rows.append({"model": model, "calls": totals.calls,
                     "actual_cost_usd": nanos_to_usd(actual),
                     "repriced_cost_usd": nanos_to_usd(repriced),
                     "difference_usd": nanos_to_usd(repriced - actual)})
    rows.sort(key=lambda r: -r["actual_cost_usd"])
    return WhatIf(target=target_price.name, period=period, rows=rows, actual_nanos=actual_total,
                  repriced_nanos=repriced_total, skipped_models=sorted(skipped))

