"""The Token Budget seed's daily, weekly and monthly reports: usage, budget status, trend,
forecast, anomalies and recommendations of one period, composed from the other reports."""

from __future__ import annotations

import datetime as dt
from typing import Any

from budgetkit.errors import ConfigurationError

from ._budgets import budget_report
from ._cost_analysis import cost_analysis
from ._forecast import detect_anomalies, forecast
from ._reports import as_source, fill_series, summarize_many

__all__ = ["periodic_report"]


_PERIOD_DAYS = {"day": 1, "week": 7, "month": 30}


def periodic_report(source: Any, period: str = "day", *, now: dt.datetime | None = None,
                    **filters: Any) -> dict[str, Any]:
    """The Token Budget seed's daily, weekly and monthly reports.

    All three: usage per model and per operation, budget status (used, remaining,
    percentage) and alerts of the period. Weekly and monthly add the day-by-day trend, a
    forecast of the calendar period's end spend, anomalies and recommendations; monthly
    adds the cost analysis.
    """
    if period not in _PERIOD_DAYS:
        raise ConfigurationError(f"period must be day, week or month, got {period!r}")
    src = as_source(source, now=now)
    days = _PERIOD_DAYS[period]
    by_model, by_op, by_day = summarize_many(src, ["model", "operation_type", "day"],
                                             days=days, **filters)
    budgets = budget_report(src)
    since = by_model.period.start
    report: dict[str, Any] = {
        "report": {"day": "daily", "week": "weekly", "month": "monthly"}[period],
        "period": by_model.period.to_dict(),
        "totals": by_model.totals.to_dict(),
        "by_model": [g.to_dict() for g in by_model.groups],
        "by_operation": [g.to_dict() for g in by_op.groups],
        "budgets": budgets["budgets"],
        "alerts": [a for a in budgets["alerts"] if a["created_at"] >= since.isoformat()],
    }
    if period in ("week", "month"):
        report["trend"] = [g.to_dict() for g in fill_series(by_day, "day")]
        report["forecast"] = forecast(src, period=period, **filters).to_dict()
        report["anomalies"] = [a.to_dict() for a in detect_anomalies(src, days=days, **filters)]
        analysis = cost_analysis(src, days=days, **filters)
        report["recommendations"] = [r.to_dict() for r in analysis.recommendations]
        if period == "month":
            report["cost_analysis"] = analysis.to_dict()
    return report
