"""Terminal output for the command line: tables, money, bars and a progress bar.

Plain text that reads well in a terminal and in a CI log; no dependency.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

__all__ = ["money", "integer", "table", "bar", "Progress"]


def money(usd: float | None) -> str:
    """``$12.35``, ``$0.0042``, ``$0.000015``: enough digits to see small costs."""
    if usd is None:
        return "-"
    amount = abs(usd)
    if amount >= 100:
        text = f"{amount:,.2f}"
    elif amount >= 1:
        text = f"{amount:.2f}"
    elif amount >= 0.01:
        text = f"{amount:.4f}"
    elif amount == 0:
        text = "0"
    else:
        text = f"{amount:.6f}"
    return ("-$" if usd < 0 else "$") + text


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


class Progress:
    """``[#####.....]  52%  5,200/10,000 export`` on stderr, redrawn in place.

    Drawn only when the stream is a terminal (scripts and CI logs stay clean) unless
    ``enabled`` says otherwise; redraws at most 10 times a second.
    """

    def __init__(self, label: str, total: int | None = None, *, stream: IO[str] | None = None,
                 enabled: bool | None = None) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (self.total is None or done < self.total):
            return
        self._last = now
        width = max(10, min(40, shutil.get_terminal_size((80, 20)).columns - 40))
        if self.total:
            filled = int(width * min(done, self.total) / self.total)
            text = (f"[{'#' * filled}{'.' * (width - filled)}] "
                    f"{100 * done / self.total:3.0f}%  {done:,}/{self.total:,} {self.label}")
        else:
            text = f"{done:,} {self.label}"
        self.stream.write("\r" + text)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
