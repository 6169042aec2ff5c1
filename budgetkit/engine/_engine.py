"""The engine: the facade an application and the adapters talk to.

It composes the services and hands each step of a call to the one that owns it: the
ledger's :class:`~budgetkit.ledger.UsageRecorder` builds tickets and turns each into one
usage row, the :class:`~budgetkit.ledger.BatchWriter` (with its journal) writes the rows,
:class:`~budgetkit.ledger.DeferredJobs` runs adapters' bookkeeping off their threads, the
budget book (``_budget_methods``, :mod:`budgetkit.budgets`) admits calls, and the response
cache (:mod:`budgetkit.cache`) is created on first use. Each is usable on its own; what
stays here is how they are wired and the order of one call's steps.

The life of a call is ``admit`` → (provider) → ``settle`` or ``release``. Every ticket ends
in exactly one usage row, whichever of ``settle`` / ``release`` runs first; the second is a
no-op. Framework adapters call exactly these public methods, so code outside LangChain and
LlamaIndex gets the same behaviour.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from budgetkit.errors import ConfigurationError
from budgetkit.ledger import (
    BatchWriter,
    DeferredJobs,
    Store,
    Ticket,
    UsageRecord,
    UsageRecorder,
    UsageRow,
    open_journal,
    utcnow,
)
from budgetkit.pricing import PriceCatalog, is_exact

from ._budget_methods import BudgetMethods

if TYPE_CHECKING:
    from budgetkit.budgets import AdmissionLane
    from budgetkit.ledger import Status, UsageSource

__all__ = ["Engine", "Ticket", "UsageRecord"]

logger = logging.getLogger("budgetkit")

#: Seconds a journaled row may wait for its batch to be written to the database.
_JOURNALED_INTERVAL = 1.0

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_fork_hook_installed = False


def _watch_forks(engine: Engine) -> None:
    global _fork_hook_installed
    _engines.add(engine)
    if not _fork_hook_installed:
        _fork_hook_installed = True
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    for engine in list(_engines):
        if not engine._closed:
            engine._after_fork_in_child()


def _is_bad_row(error: BaseException) -> bool:
    """Whether the database refused a write for the data itself (a value too long, a
    duplicate id), not for being unreachable."""
    from sqlalchemy.exc import DataError, IntegrityError

    return isinstance(error, (DataError, IntegrityError))


class Engine(BudgetMethods):
    """Tracks, prices and (with budgets) admits every model call of an application.

    ``db`` is a SQLAlchemy URL or a SQLite file path; by default ``BUDGETKIT_DB`` or
    ``~/.budgetkit/budgetkit.db``. ``store_prompts`` keeps a redacted 200-character
    preview of each prompt (off by default: prompts often hold personal data).
    ``retention_days`` purges older rows at start and on :meth:`purge`.
    ``clock`` returns the current time as a timezone-aware or naive-UTC datetime (tests
    inject a fake one). The engine is thread-safe and usable from asyncio code.
    ``journal``: each usage row is appended to a local journal before the call that
    recorded it returns, and an engine opening the ledger replays what a killed process
    left (see docs/reliability.md). True: next to a SQLite file, or
    ``BUDGETKIT_JOURNAL_DIR`` / ``~/.budgetkit/journal/`` for other databases; a folder
    path; False: no journal (rows queued at a SIGKILL are then lost).
    """

    def __init__(self, db: str | Any | None = None, *, catalog: PriceCatalog | None = None,
                 project: str | None = None, store_prompts: bool = False,
                 retention_days: int | None = None,
                 default_max_output_tokens: int = UsageRecorder.DEFAULT_MAX_OUTPUT,
                 clock: Callable[[], dt.datetime] = utcnow,
                 batch_size: int = 500, max_queue: int = 10_000,
                 max_backlog: int = 100_000,
                 journal: bool | str | os.PathLike[str] = True) -> None:
        if retention_days is not None and retention_days <= 0:
            raise ConfigurationError(f"retention_days must be > 0, got {retention_days}")
        self.retention_days = retention_days
        self._lock = threading.Lock()  # creates the budget book once
        self._budgets = None  # the budget book, created by add_budget
        self._closed = False
        #: Tickets and usage rows (see :class:`~budgetkit.ledger.UsageRecorder`).
        self.recorder = UsageRecorder(catalog=catalog, project=project,
                                      store_prompts=store_prompts,
                                      default_max_output_tokens=default_max_output_tokens,
                                      clock=clock, budgets=self._current_budgets)
        self.store = Store(db) if not isinstance(db, Store) else db
        self.store.create_tables()
        self._deferred = DeferredJobs(max_waiting=max_queue, wake_at=batch_size)
        opened = open_journal(self.store, journal)
        # With the journal a queued row is already safe on disk, so the database gets rows
        # in batches a second apart (fewer, larger transactions: less CPU per call);
        # without it, within 50 ms, as before.
        self._writer = BatchWriter(self.store.insert_usage, batch_size=batch_size,
                                   max_queue=max_queue, max_backlog=max_backlog,
                                   flush_interval=_JOURNALED_INTERVAL if opened else 0.05,
                                   prepare=self._deferred.run, prepare_due=self._deferred.due,
                                   prepare_delay=DeferredJobs.GATHER_DELAY,
                                   is_bad_row=_is_bad_row, journal=opened)
        self._deferred.writer = self._writer
        self.recorder.submit = self._writer.submit
        _watch_forks(self)
        if retention_days is not None:
            self.purge()

    # The recorder's settings, read where they always were.
    @property
    def catalog(self) -> PriceCatalog:
        return self.recorder.catalog

    @property
    def project(self) -> str | None:
        return self.recorder.project

    @property
    def store_prompts(self) -> bool:
        return self.recorder.store_prompts

    @property
    def default_max_output_tokens(self) -> int:
        return self.recorder.default_max_output_tokens

    # -- lifecycle ------------------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        """A forked child (gunicorn --preload, multiprocessing's fork) keeps using this
        engine: its own database connections, locks and threads, none of the parent's
        pending work (the parent finishes that; its writer restarts on its own)."""
        self.store.engine.dispose(close=False)  # the parent's connections stay the parent's
        self._deferred.after_fork_in_child()
        self.recorder.after_fork_in_child()
        self._lock = threading.Lock()
        if self._budgets is not None:
            self._budgets._after_fork_in_child()

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush pending rows and release the database. Idempotent."""
        if self._closed:
            return
        self._deferred.run()
        self._closed = self._deferred.closed = True
        if self._budgets is not None:
            self._budgets.close()  # settle queued budget updates first
        self._writer.close(timeout)
        self.store.dispose()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    def flush(self, timeout: float | None = 10.0, *, return_leases: bool = True) -> bool:
        """Wait until every row recorded so far is in the database, and every finished
        call's cost in its budget windows.

        ``return_leases=False`` keeps the budget room this process has leased (see
        Budgets in the README): for code that flushes often, which would otherwise give
        the room back each time and lease it again at the next busy second. A window's
        ``reserved`` then still counts that room.
        """
        self._deferred.run()  # before settling budgets: deferred jobs settle tickets
        if self._budgets is not None:
            self._budgets.flush(return_leases=return_leases)
        return self._writer.flush(timeout)

    def defer(self, job: Callable[[], object]) -> None:
        """Run ``job()`` off the caller's thread, before the ledger's next batch is taken.

        For adapters: what a finished call needs (parsing the response, pricing, building
        its row) can wait, and an LLM app's threads mostly wait on the network, when this
        work then costs them nothing. The ledger's writer runs jobs about 0.1 s after the
        first of them arrives (see :class:`~budgetkit.ledger.DeferredJobs`); :meth:`flush`,
        :meth:`close`, normal exit and SIGTERM run every waiting job first. Jobs run in
        order, one at a time; a job that raises is logged. When too many are waiting, or the
        oldest has waited over 0.25 s (the writer is stuck on the database), the caller runs
        them itself: a job's row reaches the journal only when the job runs.
        """
        self._deferred.add(job)

    def run_deferred(self) -> int:
        """Run every deferred job now, on this thread; returns how many ran."""
        return self._deferred.run()

    @property
    def has_budgets(self) -> bool:
        """Whether any budget is registered here or stored in the ledger (calls are then
        admitted before they run). Asked before every call: a monotonic read, and a look
        at the ledger's budgets once a second."""
        budgets = self._current_budgets()
        return budgets is not None and bool(budgets._budgets)

    def mark_end(self) -> tuple[float, dt.datetime | float]:
        """The moment a call ended, for :attr:`Ticket.ended` (latency and row time); see
        :meth:`UsageRecorder.mark_end`."""
        return self.recorder.mark_end()

    end_time = staticmethod(UsageRecorder.end_time)

    def now(self) -> dt.datetime:
        """The engine clock's current time as naive UTC."""
        return self.recorder.now()

    def add_listener(self, listener: Callable[[UsageRecord], None]) -> None:
        """Call ``listener(record)`` for every usage record, on the thread that finishes
        the call: the caller's for :meth:`settle` / :meth:`release` / :meth:`record`, the
        ledger writer's for work an adapter deferred (see :meth:`defer`)."""
        self.recorder.add_listener(listener)

    def remove_listener(self, listener: Callable[[UsageRecord], None]) -> None:
        self.recorder.remove_listener(listener)

    # -- counting -------------------------------------------------------------------------
    def count_tokens(self, text: str, model: str) -> int:
        return self.recorder.count_tokens(text, model)

    def count_message_tokens(self, messages: Iterable[Mapping[str, Any]], model: str, *,
                             tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        return self.recorder.count_message_tokens(messages, model, tools=tools)

    def count_tool_tokens(self, tools: Sequence[Mapping[str, Any]], model: str) -> int:
        """Prompt tokens of OpenAI-format tool definitions sent with a call."""
        return self.recorder.count_tool_tokens(tools, model)

    def is_exact(self, model: str) -> bool:
        return is_exact(model, catalog=self.catalog)

    def estimate_cost(self, model: str, input_tokens: int, output_tokens: int = 0, *,
                      cached_input_tokens: int = 0, cache_write_tokens: int = 0) -> float:
        return self.catalog.estimate_cost(model, input_tokens, output_tokens,
                                          cached_input_tokens=cached_input_tokens,
                                          cache_write_tokens=cache_write_tokens)

    # -- the life of a call -----------------------------------------------------------
    def admit(self, model: str, *, input_tokens: int | None = None,
              messages: Sequence[Mapping[str, Any]] | None = None, prompt: str | None = None,
              max_output_tokens: int | None = None, operation_type: str = "chat_completion",
              provider: str | None = None, user_id: str | None = None,
              session_id: str | None = None, project: str | None = None,
              request_id: str | None = None, run_id: str | None = None,
              parent_run_id: str | None = None, root_run_id: str | None = None,
              task_type: str | None = None, attempt: int | None = None,
              route_reason: str | None = None, tags: Iterable[str] = (),
              metadata: Mapping[str, Any] | None = None,
              tools: Sequence[Mapping[str, Any]] | None = None) -> Ticket:
        """Price the call's worst case and check every budget that applies.

        Give the prompt as ``input_tokens`` (already counted), ``messages`` (OpenAI-format
        dicts) or ``prompt`` (text); ``tools`` (OpenAI-format tool definitions sent with the
        messages) are part of the prompt. Raises :class:`BudgetExceeded` when a budget would
        be broken; nothing is reserved or recorded then except a ``blocked`` row.
        """
        ticket = self.recorder.ticket(
            model, input_tokens=input_tokens, messages=messages, prompt=prompt,
            max_output_tokens=max_output_tokens, operation_type=operation_type,
            provider=provider, user_id=user_id, session_id=session_id, project=project,
            request_id=request_id, run_id=run_id, parent_run_id=parent_run_id,
            root_run_id=root_run_id, task_type=task_type, attempt=attempt,
            route_reason=route_reason, tags=tags, metadata=metadata, tools=tools)
        if self._current_budgets() is not None:
            self._with_bound(ticket, messages, prompt, tools)
            self._reserve(ticket)
        return ticket

    def _reserve(self, ticket: Ticket) -> Ticket:
        """Reserve in every budget, or write the ``blocked`` row and raise."""
        budgets = self._budgets
        assert budgets is not None  # called only when budgets are registered
        try:
            budgets.reserve(ticket)
        except Exception as exc:
            from budgetkit.errors import BudgetExceeded

            if isinstance(exc, BudgetExceeded):
                self.recorder.block(ticket, type(exc).__name__)
            raise
        return ticket

    def ticket(self, model: str, **arguments: Any) -> Ticket:
        """A ticket for a call, like :meth:`admit` (the same arguments) but checking no
        budget.

        For a call that has already happened (an adapter that does its bookkeeping after
        the call): settling it still counts its cost in every budget that applies.
        """
        return self.recorder.ticket(model, **arguments)

    def _with_bound(self, ticket: Ticket, messages: Sequence[Mapping[str, Any]] | None,
                    prompt: str | None, tools: Sequence[Mapping[str, Any]] | None) -> None:
        """Give a ticket about to be checked its prompt's bound: leases admit on it without
        counting the prompt (None: it is counted when the check needs it)."""
        if not ticket.input_counted:
            ticket.input_bound = self.prompt_bound(ticket.model, messages=messages,
                                                   prompt=prompt, tools=tools)

    def prompt_bound(self, model: str, *, messages: Sequence[Mapping[str, Any]] | None = None,
                     prompt: str | None = None,
                     tools: Sequence[Mapping[str, Any]] | None = None) -> int | None:
        """A cheap upper bound of a prompt's tokens, for :meth:`AdmissionLane.admit` (see
        :meth:`UsageRecorder.prompt_bound`); None when it must be counted."""
        return self.recorder.prompt_bound(model, messages=messages, prompt=prompt, tools=tools)

    def lane(self, ticket: Ticket) -> AdmissionLane | None:
        """An admission lane for calls like ``ticket``, just admitted (same model and
        attribution): it admits them from leases without building a ticket first (see
        ``budgetkit.budgets._lane``). None when no budget is registered or such calls
        cannot be admitted in memory (per-run budgets, windows not looked up yet)."""
        if self._budgets is None:
            return None
        return self._budgets.lane(ticket, self.recorder.default_output(ticket.price),
                                  self.recorder.wall_clock)

    async def aadmit(self, model: str, **kwargs: Any) -> Ticket:
        """:meth:`admit` for asyncio code (budget checks may touch the database).

        If the awaiting task is cancelled while the admit thread is still reserving, the
        reservation is released as soon as that thread finishes.
        """
        budgets = self._current_budgets()
        if budgets is None:
            return self.admit(model, **kwargs)
        ticket = self.ticket(model, **kwargs)
        self._with_bound(ticket, kwargs.get("messages"), kwargs.get("prompt"),
                         kwargs.get("tools"))
        if budgets.reserve_in_memory(ticket):  # leases with room: no thread needed
            return ticket
        import contextvars

        call = functools.partial(contextvars.copy_context().run, self._reserve, ticket)
        future = asyncio.get_running_loop().run_in_executor(None, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            def give_back(done: asyncio.Future[Ticket]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self.release(done.result(), error="CancelledError")

            future.add_done_callback(give_back)
            raise

    def settle(self, ticket: Ticket, *, input_tokens: int | None = None, output_tokens: int = 0,
               cached_input_tokens: int = 0, cache_write_tokens: int = 0,
               reasoning_tokens: int = 0, model: str | None = None,
               usage_source: UsageSource = "provider",
               metadata: Mapping[str, Any] | None = None) -> UsageRecord | None:
        """Record what the call really used; the actual cost replaces the reservation.

        ``input_tokens`` includes cached and cache-write tokens; ``output_tokens`` includes
        reasoning tokens (the providers' own convention). ``model`` is the model the
        provider reports (a dated snapshot, say), priced if the catalog knows it.
        Returns ``None`` if the ticket was already settled or released.
        """
        return self.recorder.settle(
            ticket, input_tokens=input_tokens, output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens, cache_write_tokens=cache_write_tokens,
            reasoning_tokens=reasoning_tokens, model=model, usage_source=usage_source,
            metadata=metadata)

    async def asettle(self, ticket: Ticket, **kwargs: Any) -> UsageRecord | None:
        """:meth:`settle` for asyncio code (on the loop: settling only queues)."""
        if self._budgets is None or self._budgets.settles_in_memory:
            return self.settle(ticket, **kwargs)
        return await asyncio.to_thread(self.settle, ticket, **kwargs)

    def release(self, ticket: Ticket, *, error: BaseException | str | None = None,
                status: Status = "error", input_tokens: int = 0, output_tokens: int = 0,
                usage_source: UsageSource = "estimated") -> UsageRecord | None:
        """End a call that failed or was cancelled: its reservation is returned.

        The row has status ``error`` and no cost, unless the provider reported (or the
        adapter counted) tokens it will bill anyway, passed as ``input_tokens`` /
        ``output_tokens``. Returns ``None`` if the ticket was already finished.
        """
        return self.recorder.release(ticket, error=error, status=status,
                                     input_tokens=input_tokens, output_tokens=output_tokens,
                                     usage_source=usage_source)

    async def arelease(self, ticket: Ticket, **kwargs: Any) -> UsageRecord | None:
        """:meth:`release` for asyncio code (on the loop: releasing only queues)."""
        if self._budgets is None or self._budgets.settles_in_memory:
            return self.release(ticket, **kwargs)
        return await asyncio.to_thread(self.release, ticket, **kwargs)

    def discard(self, ticket: Ticket) -> bool:
        """End a ticket *without* a usage row, returning its reservations.

        For calls that another component records itself (a response-cache hit writes its
        own ``cached`` row). Returns ``False`` if the ticket was already finished.
        """
        return self.recorder.discard(ticket)

    def record(self, model: str, *, input_tokens: int, output_tokens: int = 0,
               cached_input_tokens: int = 0, cache_write_tokens: int = 0,
               reasoning_tokens: int = 0, status: Status = "ok",
               usage_source: UsageSource = "provider", saved_nanos: int = 0,
               latency_ms: float | None = None, error_type: str | None = None,
               created_at: dt.datetime | None = None, **attribution: Any) -> UsageRecord:
        """Record a call that was not admitted first (embeddings, cache hits, imports).

        ``status="cached"`` records a zero-cost row; pass what the hit saved as
        ``saved_nanos``. ``created_at`` is when the call happened (default: now).
        ``attribution`` takes the keyword arguments of :meth:`admit`. Counts must be whole
        numbers >= 0 (a NaN, infinity or negative raises :class:`ConfigurationError`
        naming the argument, and nothing is recorded).
        """
        return self.recorder.record(
            model, input_tokens=input_tokens, output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens, cache_write_tokens=cache_write_tokens,
            reasoning_tokens=reasoning_tokens, status=status, usage_source=usage_source,
            saved_nanos=saved_nanos, latency_ms=latency_ms, error_type=error_type,
            created_at=created_at, **attribution)

    # -- response cache (see _cache) ------------------------------------------------------
    def response_cache(self, **options: Any) -> Any:
        """The engine's :class:`ResponseCache`, created on first use with ``options``."""
        from budgetkit.cache import engine_cache

        return engine_cache(self, options)

    def cached(self, model: str | None = None, **options: Any) -> Any:
        """Decorator: serve repeated calls of a function from the engine's cache."""
        from budgetkit.cache import cached

        return cached(self.response_cache(), model, **options)

    # -- reading ------------------------------------------------------------------------
    def usage(self, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
              model: str | None = None, user_id: str | None = None,
              operation_type: str | None = None, run_id: str | None = None,
              root_run_id: str | None = None, request_id: str | None = None,
              status: str | None = None, project: str | None = None,
              session_id: str | None = None, tag: str | None = None,
              limit: int | None = None) -> list[UsageRow]:
        """Recorded rows matching every filter given (after flushing pending rows)."""
        self.flush(return_leases=False)  # reading rows needs no budget room back
        return self.store.query_usage(
            since=since, until=until, model=model, user_id=user_id,
            operation_type=operation_type, run_id=run_id, root_run_id=root_run_id,
            request_id=request_id, status=status, project=project, session_id=session_id,
            tag=tag, limit=limit)

    def purge(self, older_than_days: int | None = None) -> int:
        """Delete usage rows older than ``older_than_days`` (default: ``retention_days``)."""
        days = older_than_days if older_than_days is not None else self.retention_days
        if days is None or days <= 0:
            raise ConfigurationError(f"older_than_days must be > 0, got {days}")
        self.flush()
        return self.store.purge_usage(self.now() - dt.timedelta(days=days))
