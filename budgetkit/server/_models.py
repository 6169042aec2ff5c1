"""Response models (they make the OpenAPI schema) in the Token Usage Tracking seed's shapes.

Field names follow the seed (``model_name``, ``operation_count``, ``total_cost_usd``);
budgetkit adds cached tokens, cache hits, savings and latency next to them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from budgetkit.reports import UsageGroup


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Period(_Open):
    start: str
    end: str


class SummaryRow(_Open):
    operation_type: str | None = None
    model_name: str | None = None
    operation_count: int
    total_input_tokens: int
    total_output_tokens: int
    total_cached_input_tokens: int
    total_tokens: int
    total_cost_usd: float
    total_saved_usd: float
    cache_hits: int
    avg_latency_ms: float | None = None


class Totals(_Open):
    total_operations: int
    total_input_tokens: int
    total_output_tokens: int
    total_tokens: int
    total_cost_usd: float
    total_saved_usd: float
    cache_hits: int


class DailyUsage(_Open):
    usage_date: str
    operation_count: int
    total_input_tokens: int
    total_output_tokens: int
    total_tokens: int
    total_cost_usd: float


class UsageSummary(_Open):
    summary: list[SummaryRow]
    totals: Totals


class TokenUsageResponse(_Open):
    message: str
    period: Period
    summary: UsageSummary
    daily_usage: list[DailyUsage]


class UserUsage(_Open):
    user_id: str
    summary: list[SummaryRow]
    totals: Totals


class UserUsageResponse(_Open):
    message: str
    period: Period
    user_usage: UserUsage


class OperationCost(_Open):
    total_cost: float
    total_tokens: int
    operation_count: int
    cost_per_operation: float
    cost_per_token: float


class Recommendation(_Open):
    kind: str
    message: str
    metric: str
    value: float
    threshold: float
    potential_savings_usd: float | None = None


class CostAnalysis(_Open):
    total_cost_usd: float
    total_tokens: int
    cost_per_token: float
    operation_costs: dict[str, OperationCost]
    model_costs: dict[str, OperationCost]
    recommendations: list[str]
    recommendation_details: list[Recommendation]


class CostAnalysisResponse(_Open):
    message: str
    cost_analysis: CostAnalysis


def seed_summary_row(group: UsageGroup) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if "operation_type" in group.key:
        row["operation_type"] = group.key["operation_type"]
    if "model" in group.key:
        row["model_name"] = group.key["model"]
    row.update(operation_count=group.calls, total_input_tokens=group.input_tokens,
               total_output_tokens=group.output_tokens,
               total_cached_input_tokens=group.cached_input_tokens,
               total_tokens=group.total_tokens, total_cost_usd=group.cost,
               total_saved_usd=group.saved, cache_hits=group.cache_hits,
               avg_latency_ms=group.avg_latency_ms)
    return row


def seed_totals(group: UsageGroup) -> dict[str, Any]:
    return {"total_operations": group.calls, "total_input_tokens": group.input_tokens,
            "total_output_tokens": group.output_tokens, "total_tokens": group.total_tokens,
            "total_cost_usd": group.cost, "total_saved_usd": group.saved,
            "cache_hits": group.cache_hits}


def seed_daily(group: UsageGroup) -> dict[str, Any]:
    return {"usage_date": group.key["day"], "operation_count": group.calls,
            "total_input_tokens": group.input_tokens,
            "total_output_tokens": group.output_tokens, "total_tokens": group.total_tokens,
            "total_cost_usd": group.cost}
