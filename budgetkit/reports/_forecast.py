"""Forecast of a period's end spend, and cost anomalies, from the daily (or hourly) series.

Both work on the zero-filled cost series that :func:`budgetkit.cost_series` reads from
the database (one GROUP BY); only those few dozen numbers are handled in Python.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from budgetkit.errors import ConfigurationError
from budgetkit.pricing import nanos_to_usd

from ._reports import Period, as_source, cost_series, summarize

__all__ = ["Forecast", "Anomaly", "forecast", "detect_anomalies"]

_PERIODS = ("day", "week", "month")


@dataclass(frozen=True)
class Forecast:
    """Projected spend at the end of the current calendar period."""

    period: Period
    now: dt.datetime
    spent_nanos: int
    projected_nanos: int
    daily_rate_usd: float
    method: str
    history_days: int
    history: list[dict[str, Any]]

    @property
    def spent(self) -> float:
        return nanos_to_usd(self.spent_nanos)

    @property
    def projected(self) -> float:
        return nanos_to_usd(self.projected_nanos)

    def to_dict(self) -> dict[str, Any]:
        return {"period": self.period.to_dict(), "as_of": self.now.isoformat(),
                "spent_usd": self.spent, "projected_total_usd": self.projected,
                "projected_remaining_usd": nanos_to_usd(self.projected_nanos - self.spent_nanos),
                "daily_rate_usd": self.daily_rate_usd, "method": self.method,
                "history_days": self.history_days, "history": self.history}


def calendar_period(now: dt.datetime, period: str) -> Period:
    """The UTC calendar day / week (Monday first) / month containing ``now``."""
    today = dt.datetime.combine(now.date(), dt.time())
    if period == "day":
        return Period(today, today + dt.timedelta(days=1))
    if period == "week":
        start = today - dt.timedelta(days=today.weekday())
        return Period(start, start + dt.timedelta(days=7))
    if period == "month":
        start = today.replace(day=1)
        end = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        return Period(start, end)
    raise ConfigurationError(f"period must be one of {', '.join(_PERIODS)}, got {period!r}")


def _linear_fit(values: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of values at x = 0.5, 1.5, ... (day midpoints)."""
    n = len(values)
    xs = [i + 0.5 for i in range(n)]
    mean_x, mean_y = sum(xs) / n, sum(values) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values)) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def forecast(source: Any, *, period: str = "month", lookback_days: int = 14,
             now: dt.datetime | None = None, **filters: Any) -> Forecast:
    """Project the current calendar period's total spend.

    Method: a least-squares linear trend over the daily cost of the last ``lookback_days``
    complete days (from the first day with any usage), evaluated at the middle of the
    time left and multiplied by the days left, added to what is already spent. With fewer
    than 3 days of history the mean daily cost is used; with none, today's rate so far.
    """
    if lookback_days < 1:
        raise ConfigurationError(f"lookback_days must be >= 1, got {lookback_days}")
    src = as_source(source, now=now)
    window = calendar_period(src.now, period)
    spent = summarize(src, group_by=(), start_date=window.start, **filters).totals.cost_nanos
    today = dt.datetime.combine(src.now.date(), dt.time())
    series = cost_series(src, unit="day", start_date=today - dt.timedelta(days=lookback_days),
                         end_date=today, **filters)
    while series and series[0].calls == 0:  # before the first usage is not "zero spend"
        series.pop(0)
    values = [float(g.cost_nanos) for g in series]
    remaining_days = max(0.0, (window.end - src.now).total_seconds() / 86400.0)
    elapsed_today = (src.now - today).total_seconds() / 86400.0
    if len(values) >= 3:
        intercept, slope = _linear_fit(values)
        midpoint = len(values) + elapsed_today + remaining_days / 2
        rate = max(0.0, intercept + slope * midpoint)
        method = (f"linear trend (least squares) over the last {len(values)} complete days, "
                  "evaluated at the middle of the time left")
    elif values:
        rate = sum(values) / len(values)
        method = f"mean daily cost of the last {len(values)} complete day(s)"
    else:
        today_cost = summarize(src, group_by=(), start_date=today, **filters).totals.cost_nanos
        rate = today_cost / elapsed_today if elapsed_today > 0 else 0.0
        method = "today's spending rate so far (no complete day of history)"
    projected = spent + int(round(rate * remaining_days))
    history = [{"day": g.key["day"], "cost_usd": g.cost, "calls": g.calls} for g in series]
    return Forecast(period=window, now=src.now, spent_nanos=spent, projected_nanos=projected,
                    daily_rate_usd=nanos_to_usd(int(round(rate))), method=method,
                    history_days=len(values), history=history)


@dataclass(frozen=True)
class Anomaly:
    """One hour or day whose cost is far from the recent mean."""

    bucket: str
    unit: str
    cost_nanos: int
    mean_nanos: float
    std_nanos: float
    deviations: float
    direction: str
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "unit": self.unit, "cost_usd": nanos_to_usd(self.cost_nanos),
                "expected_usd": self.mean_nanos / 1e9, "std_usd": self.std_nanos / 1e9,
                "deviations": None if math.isinf(self.deviations) else round(self.deviations, 2),
                "direction": self.direction, "description": self.description}


def detect_anomalies(source: Any, *, unit: str = "day", days: int | None = 30,
                     threshold: float = 2.0, window: int | None = None, min_history: int = 3,
                     start_date: Any = None, end_date: Any = None,
                     now: dt.datetime | None = None, **filters: Any) -> list[Anomaly]:
    """Days (or hours) whose cost is more than ``threshold`` standard deviations from the
    mean of the previous ``window`` buckets (default 14 days / 24 hours).

    History starts at the first bucket with usage, and at least ``min_history`` buckets
    are needed before a bucket is judged. The current, unfinished bucket is only reported
    as a spike, never as a drop. A flat history followed by a change is reported with
    infinite deviations.
    """
    if unit not in ("day", "hour"):
        raise ConfigurationError(f"unit must be day or hour, got {unit!r}")
    if threshold <= 0:
        raise ConfigurationError(f"threshold must be > 0, got {threshold}")
    window = window or (14 if unit == "day" else 24)
    src = as_source(source, now=now)
    period = Period.resolve(days=days, start_date=start_date, end_date=end_date, now=src.now)
    step = dt.timedelta(days=1) if unit == "day" else dt.timedelta(hours=1)
    extended = Period(period.start - window * step, period.end, period.end_inclusive)
    series = cost_series(src, unit=unit, period=extended, **filters)
    first_label = (period.start.strftime("%Y-%m-%d") if unit == "day"
                   else period.start.strftime("%Y-%m-%d %H:00"))
    current_label = (src.now.strftime("%Y-%m-%d") if unit == "day"
                     else src.now.strftime("%Y-%m-%d %H:00"))
    started = None
    anomalies = []
    for index, group in enumerate(series):
        if started is None and group.calls:
            started = index
        label = str(group.key[unit])
        if started is None or index == started or label < first_label:
            continue
        history = [g.cost_nanos for g in series[max(started, index - window):index]]
        if len(history) < min_history:
            continue
        mean = sum(history) / len(history)
        std = math.sqrt(sum((v - mean) ** 2 for v in history) / len(history))
        value = group.cost_nanos
        if value == mean:
            continue
        z = (value - mean) / std if std > 0 else math.copysign(math.inf, value - mean)
        if abs(z) <= threshold or (z < 0 and label >= current_label):
            continue
        direction = "spike" if z > 0 else "drop"
        span = f"{len(history)}-{unit}"
        if math.isinf(z):
            how = f"while each of the previous {len(history)} {unit}s cost ${mean / 1e9:.4f}"
        else:
            how = (f"{abs(z):.1f} standard deviations {'above' if z > 0 else 'below'} the "
                   f"{span} mean of ${mean / 1e9:.4f} (std ${std / 1e9:.4f})")
        anomalies.append(Anomaly(
            bucket=label, unit=unit, cost_nanos=value, mean_nanos=mean, std_nanos=std,
            deviations=z, direction=direction,
            description=f"Cost {direction} on {label}: ${value / 1e9:.4f}, {how}"))
    return anomalies
