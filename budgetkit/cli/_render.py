"""Text renderings shared by the commands and the demo: the summary report and the
budget table. Apart from the argument parsing so ``budgetkit demo`` can print the same
report without importing the command line (which imports the demo)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._console import bar, integer, money, table

__all__ = ["amount", "budget_table", "group_table", "period_line", "render_summary"]


def period_line(period: dict[str, str]) -> str:
    start, end = period["start"][:16].replace("T", " "), period["end"][:16].replace("T", " ")
    return f"{start} → {end} UTC"


# -- report ---------------------------------------------------------------------------------
def group_table(groups: list[dict[str, Any]], dims: Sequence[str]) -> str:
    rows = [[*(g.get(d) if g.get(d) is not None else "(none)" for d in dims),
             integer(g["calls"]), integer(g["input_tokens"]), integer(g["output_tokens"]),
             money(g["cost_usd"]), money(g["saved_usd"]), integer(g["cache_hits"]),
             "-" if g["avg_latency_ms"] is None else f"{g['avg_latency_ms']:.0f}"]
            for g in groups]
    return table(rows, [*dims, "calls", "input", "output", "cost", "saved", "hits", "ms"],
                 "l" * len(dims) + "rrrrrrr")


def render_summary(engine: Any, span: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The default report: totals, by model, by operation, daily spend, advice."""
    from budgetkit.reports import as_source, cost_analysis, fill_series, summarize_many

    src = as_source(engine)
    by_model, by_op, by_day = summarize_many(src, ["model", "operation_type", "day"], **span)
    series = fill_series(by_day, "day")
    analysis = cost_analysis(src, **span)
    totals = by_model.totals
    data: dict[str, Any] = {"period": by_model.period.to_dict(), "totals": totals.to_dict(),
            "by_model": [g.to_dict() for g in by_model.groups],
            "by_operation": [g.to_dict() for g in by_op.groups],
            "daily": [g.to_dict() for g in series],
            "recommendations": [r.to_dict() for r in analysis.recommendations]}
    hit_rate = totals.cache_hits / totals.calls if totals.calls else 0.0
    lines = [f"budgetkit report  {period_line(data['period'])}", "",
             f"calls {integer(totals.calls)}   tokens {integer(totals.total_tokens)}   "
             f"cost {money(totals.cost)}   saved by cache {money(totals.saved)} "
             f"({totals.cache_hits} hits, {hit_rate:.0%})   errors {totals.errors}   "
             f"blocked {totals.blocked}", "",
             "By model", group_table(data["by_model"], ["model"]), "",
             "By operation", group_table(data["by_operation"], ["operation_type"]), ""]
    active = [g for g in series if g.calls]
    if active:
        top = max(g.cost for g in series)
        lines.append("Spend per day")
        for g in series[-14:]:
            lines.append(f"  {g.key['day']}  {money(g.cost):>10}  {bar(g.cost, top)}")
        lines.append("")
    if analysis.recommendations:
        lines.append("Recommendations")
        lines += [f"  - {r.message}" for r in analysis.recommendations]
    return data, "\n".join(lines).rstrip()


def amount(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return money(value) if unit == "usd" else f"{integer(value)} tok"


def budget_table(rows: list[dict[str, Any]]) -> str:
    body = [[r["budget"], r.get("scope") or "global", r["period"],
             amount(r["used"], r["unit"]), amount(r["reserved"], r["unit"]),
             amount(r["remaining"], r["unit"]), amount(r["limit"], r["unit"]),
             f"{r['percentage']:.1f}%", f"{bar(r['percentage'], 100, 10):<10}", r["level"]]
            for r in rows]
    return table(body, ["budget", "scope", "period", "used", "reserved", "remaining", "limit",
                        "%", "", "level"], "lllrrrrrll")
