"""Terminal output for the command line: tables, money and bars.

Plain text that reads well in a terminal and in a CI log; no dependency. Progress bars of
long work are in ``_progress``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from budgetkit.pricing import format_usd

__all__ = ["money", "integer", "table", "bar"]


def money(usd: Decimal | float | None) -> str:
    """Money as the API and the dashboard show it (:func:`budgetkit.pricing.format_usd`)."""
    return format_usd(usd)


def integer(value: int | float | None) -> str:
    return "-" if value is None else f"{int(value):,}"


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str],
          align: str | None = None) -> str:
    """A text table; ``align`` has one ``l`` / ``r`` per column (numbers right)."""
    body = [["" if cell is None else str(cell) for cell in row] for row in rows]
    align = align or "l" * len(headers)
    widths = [len(h) for h in headers]
    for row in body:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(widths[i]) if align[i] == "r" else cell.ljust(widths[i])
                         for i, cell in enumerate(cells)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in body]
    if not body:
        out.append("(no data)")
    return "\n".join(out)


def bar(value: float, maximum: float, width: int = 30) -> str:
    """A horizontal bar of ``value`` against ``maximum`` (eighths of a block)."""
    if maximum <= 0 or value <= 0:
        return ""
    eighths = int(round(width * 8 * min(value, maximum) / maximum))
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]
