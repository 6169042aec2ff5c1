"""Progress of a benchmark run, on stderr (the tables go to stdout).

One line per stage with the time since the start (``[  12.3 s] loading the ledger``), and a
tqdm bar over a stage's items when stderr is a terminal; with ``--quiet``, nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Stages:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.started = time.perf_counter()
        self.terminal = sys.stderr.isatty()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.started:7.1f} s] {text}", file=sys.stderr,
                  flush=True)

    def items(self, iterable: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
        """``iterable``, announced as a stage, with a bar on a terminal."""
        self.say(label)
        bar = tqdm(iterable, desc=label, total=total, file=sys.stderr, leave=False,
                   disable=self.quiet or not self.terminal)
        yield from bar

    def hook(self, label: str) -> Any:
        """A ``budgetkit.progress`` callback drawing a bar for ``label`` (a terminal only)."""
        self.say(label)
        bar = tqdm(desc=label, file=sys.stderr, leave=False,
                   disable=self.quiet or not self.terminal)

        def progress(done: int, total: int | None) -> None:
            if total is not None and bar.total != total:
                bar.total = total
            bar.update(done - bar.n)
            if total is not None and done >= total:
                bar.close()

        return progress
