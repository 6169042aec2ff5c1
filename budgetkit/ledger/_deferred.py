"""Bookkeeping that waits: jobs run off the caller's thread, before the writer's next batch.

What a finished call needs (parsing its response, pricing it, building its row) can wait a
few milliseconds, and an LLM app's threads mostly wait on the network: the work then costs
them nothing. The batch writer runs the queue (its ``prepare`` hook) just before it takes a
batch; flush, close, normal exit and SIGTERM run it too. A job's row reaches the journal only
when the job runs, so the queue is bounded in length and in age: past either bound the
caller runs it itself.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._writer import BatchWriter

__all__ = ["DeferredJobs"]

logger = logging.getLogger("budgetkit")

_YIELD_EVERY = 8  # jobs run between GIL releases on the writer's thread (each ~10-20 µs)


class DeferredJobs:
    """A queue of jobs run in order, one at a time; a job that raises is logged.

    ``max_waiting``: past this many waiting jobs the caller runs them; ``wake_at``: this
    many wake the writer at once (a full batch is waiting). The writer is attached after
    it is built (it runs this queue, and this queue wakes it).
    """

    #: Seconds a job may wait for the writer before a caller runs the queue itself: bounds
    #: what a SIGKILL can lose of deferred work while the writer waits on the database.
    MAX_AGE = 0.25
    #: Seconds the writer lets jobs gather before running them (one wake-up for many calls).
    GATHER_DELAY = 0.1

    def __init__(self, *, max_waiting: int, wake_at: int) -> None:
        self._jobs: collections.deque[Callable[[], object]] = collections.deque()
        # Reentrant: SIGTERM's flush may interrupt this thread inside a job.
        self._lock = threading.RLock()
        self._max_waiting = max_waiting
        self._wake_at = wake_at
        self._since = 0.0  # monotonic time the oldest waiting job was queued
        self.writer: BatchWriter | None = None
        self.closed = False  # once closed, jobs run at once on the caller's thread

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Callable[[], object]) -> None:
        """Queue ``job``; run the queue now if it is too long or its oldest job too old."""
        if self.closed:
            job()
            return
        jobs = self._jobs
        jobs.append(job)
        waiting = len(jobs)
        writer = self.writer
        if waiting == 1:
            self._since = time.monotonic()
            if writer is not None:
                writer.poke()  # (wakes the writer only if it sleeps with nothing due)
        elif waiting >= self._max_waiting or time.monotonic() - self._since > self.MAX_AGE:
            self.run()
        elif waiting == self._wake_at and writer is not None:
            writer.wake()

    def due(self) -> float | None:
        """When the oldest waiting job was queued (monotonic), or None."""
        return self._since if self._jobs else None

    def run(self) -> int:
        """Run every waiting job now, on this thread; returns how many ran."""
        jobs = self._jobs
        ran = 0
        writer = self.writer
        on_writer = writer is not None and writer.is_writer_thread()
        with self._lock:  # also waits for a batch another thread is running
            while jobs:
                job = jobs.popleft()
                ran += 1
                try:
                    job()
                except Exception:  # one bad job must not stop the others' rows
                    logger.exception("budgetkit: deferred job %r failed", job)
                if not ran % _YIELD_EVERY and on_writer:
                    # Let the application's threads run: holding the GIL through a long
                    # batch would stall them for the interpreter's switch interval (5 ms).
                    time.sleep(0)
        return ran

    def after_fork_in_child(self) -> None:
        """A forked child runs none of its parent's jobs (the parent does)."""
        self._jobs.clear()
        self._lock = threading.RLock()
