"""The background writer: usage rows leave the hot path and reach the database in batches.

A call appends its row to a bounded in-memory queue and returns; it never wakes the writer
(waking a thread per row costs a context switch and GIL hand-off on every LLM call). One
daemon thread drains the queue in batches every ``flush_interval`` seconds, or at once when a
full batch is waiting or someone calls ``flush()``. When the database is unreachable the
batch stays in a bounded in-memory backlog, the error is logged once (and once more when
writes succeed again), and writes are retried with backoff: the user's LLM calls never wait
for, or fail because of, the ledger.

``flush()`` waits until everything handed over so far is written (or the timeout passes);
``close()``, interpreter exit and SIGTERM flush. With a :class:`~._journal.Journal`, each row
is appended to it before ``submit`` returns, so a process killed outright loses nothing
either (the next start replays it); see ``_journal`` for what survives what.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._journal import Journal

logger = logging.getLogger("budgetkit")

__all__ = ["BatchWriter"]

_Row = Mapping[str, Any]


class _Wake:
    """Wakes the writer thread: ``set()`` from any thread, ``wait()`` and ``clear()`` on it.

    Not a ``threading.Event``: SIGTERM's handler runs on the main thread between two
    bytecodes, possibly inside ``Event.set()`` of ``submit`` with the event's lock held; the
    handler's flush then called ``set()`` on the same event and the dying process hung (seen
    under load in tests/test_ledger_reliability.py). A ``SimpleQueue``'s put and get are each
    one C call, so no handler can run while one of them holds anything.
    """

    def __init__(self) -> None:
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()

    def set(self) -> None:
        self._tokens.put(None)

    def wait(self, timeout: float | None) -> bool:
        try:
            self._tokens.get(timeout=timeout)
        except queue.Empty:
            return False
        return True

    def clear(self) -> None:
        while True:
            try:
                self._tokens.get_nowait()
            except queue.Empty:
                return


class BatchWriter:
    """Write rows through ``write(batch)`` on a background thread.

    ``max_queue`` bounds the hand-over queue (rows beyond it spill to the backlog; ``submit``
    never blocks); ``max_backlog`` bounds rows kept while the database is down (beyond it the
    oldest rows are dropped, counted in ``dropped``, and logged).
    """

    def __init__(self, write: Callable[[Sequence[_Row]], None], *, batch_size: int = 500,
                 max_queue: int = 10_000, max_backlog: int = 100_000,
                 flush_interval: float = 0.05, retry_initial: float = 0.1,
                 retry_max: float = 5.0, name: str = "budgetkit-writer",
                 prepare: Callable[[], object] | None = None,
                 prepare_due: Callable[[], float | None] | None = None,
                 prepare_delay: float = 0.1, fsync_interval: float = 1.0,
                 is_bad_row: Callable[[BaseException], bool] | None = None,
                 journal: Journal | None = None) -> None:
        self._write = write
        self._journal = journal
        # The thread sleeps until something is due and never wakes on a timer while idle:
        # a row is written ``flush_interval`` after the first row of its batch was queued
        # (sooner when a batch is full or someone flushes), deferred work runs
        # ``prepare_delay`` after the first job was queued (``prepare_due`` says when that
        # was, monotonic, or None), and the journal is fsynced when bytes have waited
        # ``fsync_interval`` for the database.
        self._prepare_due = prepare_due
        self._prepare_delay = prepare_delay
        self._fsync_interval = fsync_interval
        self._first_queued: float | None = None  # monotonic: when the queue became non-empty
        self._asleep = False  # sleeping with nothing due: only a wake-up ends it
        self._sleep_until = 0.0  # monotonic end of the current sleep (inf: until woken)
        self._flushes = 0  # flush() calls waiting: write at once
        # Tells a batch the database refused for what it holds (a value too long, a
        # duplicate id) from one it could not take (down): the first is written row by
        # row and only the bad rows are dropped, so one row cannot hold back the rest.
        self._is_bad_row = is_bad_row
        # Runs before each batch is taken and at the start of every flush: work deferred
        # off the callers' threads that produces rows (see Engine.defer).
        self._prepare = prepare
        self._batch_size = batch_size
        self._queue: deque[_Row] = deque()
        self._max_queue = max_queue
        self._wake = _Wake()
        self._stopping = False
        self._backlog: deque[_Row] = deque()
        self._max_backlog = max_backlog
        self._flush_interval = flush_interval
        self._retry_initial, self._retry_max = retry_initial, retry_max
        # Reentrant: SIGTERM's handler flushes on the main thread, possibly while that
        # thread is inside ``submit`` holding this lock (a plain Lock deadlocks there).
        self._lock = threading.RLock()
        self._written_cv = threading.Condition(self._lock)
        self._submitted = 0
        self._written = 0
        self.dropped = 0
        self._failing = False
        self._dropping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        _register(self)

    # -- producer side -----------------------------------------------------------------
    def submit(self, row: _Row) -> None:
        if self._journal is not None:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._journal.append(row)  # on disk (the kernel's) before the caller goes on
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._queue) < self._max_queue:
                self._queue.append(row)
            else:  # never block the caller: move everything to the backlog, oldest first
                self._backlog.extend(self._queue)
                self._queue.clear()
                self._append_backlog([row])
            # counted once queued: a flush interrupting this (SIGTERM) never waits for a row
            # that is not there
            self._submitted += 1
            queued = len(self._queue)
            if queued == 1:
                self._first_queued = time.monotonic()
            # one wake-up per batch at most: the first row wakes a thread asleep with
            # nothing due (it then sleeps until the batch is due), a full batch wakes it
            wake = (queued == 1 and self._asleep) or queued == self._batch_size
            if wake:
                self._asleep = False
        if wake:
            self._wake.set()

    def is_writer_thread(self) -> bool:
        """Whether the calling thread is this writer's own."""
        return threading.current_thread() is self._thread

    def wake(self) -> None:
        """Take the next batch now rather than at the next interval."""
        self._wake.set()

    def poke(self) -> None:
        """New deferred work, due ``prepare_delay`` from now: wake the thread if it sleeps
        past then (with nothing due, or until a batch due later: with the journal, rows
        wait a second), so it sleeps again until the work is due; otherwise nothing (no
        wake-up per call). Without this the work waited for the batch and the callers ran
        it themselves (``DeferredJobs.MAX_AGE``), on their own threads."""
        with self._lock:
            if self._sleep_until <= time.monotonic() + self._prepare_delay:
                return
            self._asleep = False
            self._sleep_until = 0.0
        self._wake.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._submitted - self._written - self.dropped

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every row submitted so far is written; ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._run_prepare()
        with self._lock:
            target = self._submitted
            if self._written + self.dropped >= target:
                return True
            self._flushes += 1
        self._wake.set()  # write now rather than at the next interval
        try:
            with self._lock:
                while self._written + self.dropped < target:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._written_cv.wait(remaining if remaining is not None else 0.5)
        finally:
            with self._lock:
                self._flushes -= 1
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush and stop the thread. Idempotent."""
        self._run_prepare()  # deferred rows are submitted before submitting closes
        with self._lock:
            if self._closed:
                return True
            self._closed = True
        done = self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=1.0)
        if self._journal is not None:
            self._journal.close(delete=True)  # deletes only files whose rows are all in
        if not done:
            logger.error("budgetkit: %d usage rows could not be written before close",
                         self.pending)
        return done

    def _after_fork_in_child(self) -> None:
        """A forked child inherits this object but not its thread: start afresh. The rows
        queued before the fork are the parent's (it writes them); the child drops its copy
        so that none is written twice."""
        self._lock = threading.RLock()
        self._written_cv = threading.Condition(self._lock)
        self._wake = _Wake()
        self._queue.clear()
        self._backlog.clear()
        self._submitted = self._written = self.dropped = 0
        self._failing = self._dropping = self._stopping = False
        self._first_queued, self._asleep, self._flushes = None, False, 0
        self._sleep_until = 0.0
        if self._journal is not None:
            self._journal.after_fork_in_child()
        self._thread = threading.Thread(target=self._run, name=self._thread.name, daemon=True)
        if not self._closed:
            self._thread.start()

    def _run_prepare(self) -> None:
        if self._prepare is not None:
            try:
                self._prepare()
            except Exception:  # never lose the rows already queued over it
                logger.exception("budgetkit: deferred ledger work failed")

    # -- consumer side -----------------------------------------------------------------
    def _append_backlog(self, rows: Sequence[_Row]) -> None:
        self._backlog.extend(rows)
        overflow = len(self._backlog) - self._max_backlog
        if overflow > 0:
            for _ in range(overflow):
                self._backlog.popleft()
            self.dropped += overflow
            self._written_cv.notify_all()
            if not self._dropping:  # once per outage, not once per call
                self._dropping = True
                logger.error("budgetkit: usage backlog full (%d rows); dropping the oldest "
                             "rows until the database is back", self._max_backlog)

    def _take_batch(self) -> list[_Row]:
        with self._lock:
            batch: list[_Row] = []
            for source in (self._backlog, self._queue):  # older rows first
                while source and len(batch) < self._batch_size:
                    batch.append(source.popleft())
            if not self._queue:
                self._first_queued = None
        return batch

    def _next(self) -> tuple[str, float | None]:
        """What is due: ``"prepare"`` (deferred work), ``"write"`` (a batch), or ``"sleep"``
        for how long (None: until woken)."""
        now = time.monotonic()
        with self._lock:
            # read under the lock poke() takes: new work either shows here or finds the
            # thread marked asleep and wakes it (no lost wake-up)
            deferred = self._prepare_due() if self._prepare_due is not None else None
            urgent = self._flushes > 0 or self._stopping
            if deferred is not None and (urgent or now - deferred >= self._prepare_delay):
                return "prepare", None  # it queues rows: then look again
            first = self._first_queued
            if self._backlog or len(self._queue) >= self._batch_size or (
                    self._queue and (urgent or first is None
                                     or now - first >= self._flush_interval)):
                return "write", None
            waits = []
            if self._queue and first is not None:
                waits.append(first + self._flush_interval - now)
            if deferred is not None:
                waits.append(deferred + self._prepare_delay - now)
            if not waits:
                self._asleep = True  # submit() and poke() wake it
                self._sleep_until = math.inf
                return "sleep", None
            sleep = max(0.0, min(waits))
            self._sleep_until = now + sleep
            return "sleep", sleep

    def _without_bad_rows(self, batch: list[_Row]) -> list[_Row] | None:
        """Write ``batch`` row by row; drop (and log) the rows the database refuses for their
        content. Returns the rows written and dropped, or None if the database failed in
        another way meanwhile (the batch is then retried whole, as usual)."""
        written = 0
        for index, row in enumerate(batch):
            try:
                self._write([row])
                written += 1
            except Exception as exc:
                if self._is_bad_row is None or not self._is_bad_row(exc):
                    with self._lock:  # what is left goes back; written rows stay counted
                        self._written += written
                        self._backlog.extendleft(reversed(batch[index:]))
                    if self._journal is not None:
                        self._journal.committed([done["id"] for done in batch[:index]
                                                 if done])
                    return None
                with self._lock:
                    self.dropped += 1
                    self._written_cv.notify_all()
                if self._journal is not None:  # refused for its content: a replay would be too
                    self._journal.committed([row["id"]])
                logger.error("budgetkit: the database refused usage row %s (%s: %s); "
                             "dropped it, kept the others", row.get("id"),
                             type(exc).__name__, str(exc).splitlines()[0][:300])
                batch[index] = {}  # marks the dropped row
        return [row for row in batch if row]  # counted as written by the caller

    def _run(self) -> None:
        delay = self._retry_initial
        while True:
            due, sleep = self._next()
            if due == "prepare":
                self._run_prepare()
                continue
            if due == "sleep":
                if self._stopping:
                    return
                self._wake.wait(sleep)
                with self._lock:
                    self._asleep = False
                    self._sleep_until = 0.0
                self._wake.clear()
                continue
            self._run_prepare()
            batch = self._take_batch()
            if not batch:
                if self._stopping:
                    return
                continue
            journal = self._journal
            try:
                if journal is not None:  # group commit: rows that waited that long
                    journal.sync(older_than=self._fsync_interval)
                self._write(batch)
            except Exception as exc:  # the database is down or refused the batch
                if self._is_bad_row is not None and self._is_bad_row(exc):
                    kept = self._without_bad_rows(batch)
                    if kept is not None:
                        if journal is not None:
                            journal.committed([row["id"] for row in kept])
                        with self._lock:
                            self._written += len(kept)
                            self._written_cv.notify_all()
                        continue
                with self._lock:
                    self._backlog.extendleft(reversed(batch))
                    self._append_backlog(())
                    first_failure = not self._failing
                    self._failing = True
                if first_failure:
                    logger.error("budgetkit: cannot write usage rows (%s: %s); keeping them "
                                 "in memory and retrying", type(exc).__name__, exc)
                if journal is not None:  # they will wait: on the disk, not only in the cache
                    journal.sync()
                if self._stopping:
                    return
                time.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_initial
            if journal is not None:
                journal.committed([row["id"] for row in batch])
            with self._lock:
                self._written += len(batch)
                if self._dropping:
                    self._dropping = False
                    logger.error("budgetkit: %d usage rows were dropped in all while the "
                                 "database was unreachable", self.dropped)
                if self._failing:
                    self._failing = False
                    logger.warning("budgetkit: usage store reachable again; backlog of %d "
                                   "rows is being written", len(self._backlog))
                self._written_cv.notify_all()


# -- process exit --------------------------------------------------------------------------
_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()
_hooks_installed = False
_hooks_lock = threading.Lock()


def _register(writer: BatchWriter) -> None:
    global _hooks_installed
    _writers.add(writer)
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(_flush_all)
        os.register_at_fork(after_in_child=_after_fork_in_child)
        if threading.current_thread() is threading.main_thread():
            try:
                previous = signal.getsignal(signal.SIGTERM)
            except (ValueError, OSError):
                return
            # Only take SIGTERM when nobody else handles it; a framework's own handler
            # (uvicorn, gunicorn) runs its shutdown, which ends in atexit, which flushes.
            if previous in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _on_sigterm)


def _after_fork_in_child() -> None:
    global _hooks_lock
    _hooks_lock = threading.Lock()  # it may have been held by another thread at the fork
    for writer in list(_writers):
        writer._after_fork_in_child()


def _flush_all() -> None:
    for writer in list(_writers):
        try:
            writer.close(timeout=10.0)
        except Exception:  # exiting: report, never raise from atexit
            logger.exception("budgetkit: flushing usage rows at exit failed")


def _on_sigterm(signum: int, _frame: Any) -> None:
    _flush_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
