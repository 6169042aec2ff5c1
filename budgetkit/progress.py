"""The progress hook of long work: ``progress(done, total)``.

Work that can keep a user waiting (exporting a ledger, rebuilding the report rollup, warming
the cache) takes an optional ``progress`` argument and calls it as it goes:

- ``done`` counts the units finished so far (rows, buckets, entries): it only grows;
- ``total`` is how many units there are, or ``None`` while that is not known;
- it is called on the working thread, from a few times to a few hundred times per run, so
  it must be quick; an exception it raises (``KeyboardInterrupt``) stops the work.

The core only calls the hook; drawing is the caller's business. ``budgetkit``'s command line
draws a bar on a terminal (``budgetkit.cli``); a notebook can pass a tqdm bar's update, a
service can log. Nothing here imports a progress library, so the core stays light.

    from tqdm import tqdm
    from budgetkit.reports import export_usage

    with tqdm(unit=" rows") as bar:
        def show(done: int, total: int | None) -> None:
            bar.total = total
            bar.update(done - bar.n)
        export_usage(engine, "usage.csv", progress=show)
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ProgressCallback"]


class ProgressCallback(Protocol):
    """Called with the units done so far and the total (``None`` when not known yet)."""

    def __call__(self, done: int, total: int | None, /) -> None: ...
