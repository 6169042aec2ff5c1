"""Progress of the command line's long work, drawn with tqdm on stderr.

The core only calls a :class:`budgetkit.progress.ProgressCallback`; drawing it is this
module's job, so tqdm is imported by the command line and never by ``import budgetkit``.

Three ways to show a stage, chosen by where stderr goes:

- a terminal: a tqdm bar (a running count while the total is unknown), shown once the stage
  has run ``delay`` seconds so quick commands stay silent; a ticker thread keeps the elapsed
  time moving while the work sends no updates (one SQL query over a large ledger);
- not a terminal (a pipe, a file, a CI log): no bar and no carriage returns, one line when
  the stage ends, and only if it ran ``delay`` seconds or more:
  ``export: 5,200 rows in 1.2 s``;
- quiet (``--quiet``): nothing at all.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

__all__ = ["Progress"]

#: How often the ticker redraws a bar that gets no updates (the elapsed time moves).
_TICK_SECONDS = 0.5


class Progress:
    """One stage of work; ``update(done, total)`` is a ``budgetkit.progress`` callback.

    ``unit`` names what is counted (``"rows"``); without it only the elapsed time is shown.
    ``enabled`` forces the bar on (``True``) or off (``False``, the line mode); by default a
    bar is drawn when ``stream`` is a terminal. ``quiet`` shows nothing.
    """

    def __init__(self, label: str, total: int | None = None, *, unit: str = "",
                 stream: IO[str] | None = None, enabled: bool | None = None,
                 quiet: bool = False, delay: float = 1.0) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.drawing = (not quiet) and (_is_terminal(self.stream) if enabled is None
                                        else enabled)
        self.delay = delay
        self.done = 0
        self._started = time.monotonic()
        self._closed = False
        self._bar: Any = None
        self._ticker: threading.Thread | None = None
        self._stop_ticking = threading.Event()
        if self.drawing:
            from tqdm import tqdm  # the command line's dependency, not the core's

            self._bar = tqdm(total=total, desc=label, file=self.stream, delay=delay,
                             unit=f" {unit}" if unit else "it", leave=True,
                             dynamic_ncols=True, bar_format=self._format(total))
            self._ticker = threading.Thread(target=self._tick, name="budgetkit-progress",
                                            daemon=True)
            self._ticker.start()

    def _format(self, total: int | None) -> str:
        if total:
            return ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} "
                    "[{elapsed}<{remaining}]")
        if self.unit:
            return "{desc}: {n_fmt}{unit} [{elapsed}]"
        return "{desc}... [{elapsed}]"

    def _tick(self) -> None:
        while not self._stop_ticking.wait(_TICK_SECONDS):
            if time.monotonic() - self._started >= self.delay:
                self._bar.refresh()
                # tqdm counts a bar as shown only once update() drew it; without this,
                # close() would leave a bar only this thread drew without its last line
                self._bar.last_print_t = time.time()

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` units finished so far (it only grows); ``total`` when it becomes known."""
        self.done = done
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.bar_format = self._format(total)
        if self._bar is not None and done != self._bar.n:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        """End the stage: the bar stays as its final line, or the one line is written."""
        if self._closed:
            return
        self._closed = True
        seconds = time.monotonic() - self._started
        if self._bar is not None:
            self._stop_ticking.set()
            if self._ticker is not None:
                self._ticker.join()
            self._bar.close()
        elif not self.quiet and seconds >= self.delay:
            counted = f"{self.done:,} {self.unit} in " if self.unit else ""
            self.stream.write(f"{self.label}: {counted}{seconds:.1f} s\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stream-like object
        return False
