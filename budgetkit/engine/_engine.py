"""The engine: one object that owns the catalog, the token counter, the store and the ledger.

The life of a call is ``admit`` → (provider) → ``settle`` or ``release``. Every ticket ends
in exactly one usage row, whichever of ``settle`` / ``release`` runs first; the second is a
no-op. Framework adapters call exactly these public methods, so code outside LangChain and
LlamaIndex gets the same behaviour.

Over 500 lines because the path of one call (admit, settle or release, one row) is read
and tuned as one piece: it is the hot path ``benchmarks/bench_handler_overhead.py``
measures. Budget methods are in ``_budget_methods``; the services (ledger, budget book,
cache) are composed, not owned.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from budgetkit.errors import ConfigurationError
from budgetkit.ledger import (
    BatchWriter,
    Store,
    Ticket,
    UsageRecord,
    UsageRow,
    messages_text,
    new_id,
    open_journal,
    prompt_hash,
    redact_preview,
    snapshot_messages,
)
from budgetkit.pricing import (
    ModelPrice,
    PriceCatalog,
    count_message_tokens,
    count_tokens,
    count_tool_tokens,
    default_catalog,
    finite_number,
    is_exact,
    message_tokens_bound,
    nonnegative_int,
    text_tokens_bound,
    token_count,
)

from ._budget_methods import BudgetMethods

if TYPE_CHECKING:
    from budgetkit.budgets import AdmissionLane

__all__ = ["Engine", "Ticket", "UsageRecord"]

logger = logging.getLogger("budgetkit")

UsageSource = Literal["provider", "estimated"]
Status = Literal["ok", "error", "cached", "blocked"]

_DEFAULT_MAX_OUTPUT = 4096  # worst case reserved when neither caller nor catalog says
_YIELD_EVERY = 8  # deferred jobs run between GIL releases (each job is ~10-20 µs)
#: Seconds a deferred job may wait for the writer before a caller runs the queue itself:
#: bounds what a SIGKILL can lose of deferred work while the writer waits on the database.
_DEFERRED_MAX_AGE = 0.25
#: Seconds the writer lets deferred jobs gather before running them (one wake-up for many
#: calls); a job's row reaches the journal when it runs.
_DEFERRED_DELAY = 0.1
#: Seconds a journaled row may wait for its batch to be written to the database.
_JOURNALED_INTERVAL = 1.0


_EPOCH = dt.datetime(1970, 1, 1)


def _utcnow() -> dt.datetime:
    """Now as naive UTC (half the cost of ``datetime.now(timezone.utc)`` and dropping
    the zone: this runs on every call)."""
    return _EPOCH + dt.timedelta(seconds=time.time())


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
                 default_max_output_tokens: int = _DEFAULT_MAX_OUTPUT,
                 clock: Callable[[], dt.datetime] = _utcnow,
                 batch_size: int = 500, max_queue: int = 10_000,
                 max_backlog: int = 100_000,
                 journal: bool | str | os.PathLike[str] = True) -> None:
        if retention_days is not None and retention_days <= 0:
            raise ConfigurationError(f"retention_days must be > 0, got {retention_days}")
        if default_max_output_tokens <= 0:
            raise ConfigurationError(
                f"default_max_output_tokens must be > 0, got {default_max_output_tokens}")
        self.catalog = catalog if catalog is not None else default_catalog().copy()
        self.project = project
        self.store_prompts = store_prompts
        self.retention_days = retention_days
        self.default_max_output_tokens = default_max_output_tokens
        self._clock = clock
        self.store = Store(db) if not isinstance(db, Store) else db
        self.store.create_tables()
        self._deferred: collections.deque[Callable[[], object]] = collections.deque()
        # Reentrant: SIGTERM's flush may interrupt this thread inside a deferred job.
        self._deferred_lock = threading.RLock()
        self._max_deferred = max_queue
        self._deferred_since = 0.0  # when the oldest waiting deferred job was queued
        opened = open_journal(self.store, journal)
        # With the journal a queued row is already safe on disk, so the database gets rows
        # in batches a second apart (fewer, larger transactions: less CPU per call);
        # without it, within 50 ms, as before.
        self._writer = BatchWriter(self.store.insert_usage, batch_size=batch_size,
                                   max_queue=max_queue, max_backlog=max_backlog,
                                   flush_interval=_JOURNALED_INTERVAL if opened else 0.05,
                                   prepare=self.run_deferred, prepare_due=self._deferred_due,
                                   prepare_delay=_DEFERRED_DELAY, is_bad_row=_is_bad_row,
                                   journal=opened)
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._listeners: list[Callable[[UsageRecord], None]] = []
        _watch_forks(self)
        self._budgets = None  # the budget book, created by add_budget
        self._closed = False
        if retention_days is not None:
            self.purge()

    # -- lifecycle ------------------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        """A forked child (gunicorn --preload, multiprocessing's fork) keeps using this
        engine: its own database connections, locks and threads, none of the parent's
        pending work (the parent finishes that; its writer restarts on its own)."""
        self.store.engine.dispose(close=False)  # the parent's connections stay the parent's
        self._deferred.clear()
        self._deferred_lock = threading.RLock()
        self._lock = threading.Lock()
        if self._budgets is not None:
            self._budgets._after_fork_in_child()

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush pending rows and release the database. Idempotent."""
        if self._closed:
            return
        self.run_deferred()
        self._closed = True
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
        self.run_deferred()  # before settling budgets: deferred jobs settle tickets
        if self._budgets is not None:
            self._budgets.flush(return_leases=return_leases)
        return self._writer.flush(timeout)

    def defer(self, job: Callable[[], object]) -> None:
        """Run ``job()`` off the caller's thread, before the ledger's next batch is taken.

        For adapters: what a finished call needs (parsing the response, pricing, building
        its row) can wait a few milliseconds, and an LLM app's threads mostly wait on the
        network, when this work then costs them nothing. :meth:`flush`, :meth:`close`,
        normal exit and SIGTERM run every deferred job first. Jobs run in order, one at a
        time; a job that raises is logged. When too many are waiting, or the oldest has
        waited over ``_DEFERRED_MAX_AGE`` (the writer is stuck on the database), the caller
        runs them itself: a job's row reaches the journal only when the job runs.
        """
        if self._closed:
            job()
            return
        deferred = self._deferred
        deferred.append(job)
        waiting = len(deferred)
        if waiting == 1:
            self._deferred_since = time.monotonic()
            self._writer.poke()  # (wakes the writer only if it sleeps with nothing due)
        elif waiting >= self._max_deferred \
                or time.monotonic() - self._deferred_since > _DEFERRED_MAX_AGE:
            self.run_deferred()
        elif waiting == self._batch_size:
            self._writer.wake()

    @property
    def has_budgets(self) -> bool:
        """Whether any budget is registered here or stored in the ledger (calls are then
        admitted before they run). Asked before every call: a monotonic read, and a look
        at the ledger's budgets once a second."""
        budgets = self._current_budgets()
        return budgets is not None and bool(budgets._budgets)

    def mark_end(self) -> tuple[float, dt.datetime | float]:
        """The moment a call ended, for :attr:`Ticket.ended` (latency and row time): the
        ``perf_counter`` and the engine clock's time. With the wall clock the time is
        ``time.time()`` seconds, made a datetime only when the row is built (this runs on
        the caller's thread); :meth:`end_time` reads it."""
        if self._clock is _utcnow:
            return time.perf_counter(), time.time()
        return time.perf_counter(), self.now()

    @staticmethod
    def end_time(mark: tuple[float, dt.datetime | float]) -> dt.datetime:
        """The naive-UTC datetime of a :meth:`mark_end` mark."""
        moment = mark[1]
        if isinstance(moment, float):
            return _EPOCH + dt.timedelta(seconds=moment)
        return moment

    def _deferred_due(self) -> float | None:
        """When the oldest waiting deferred job was queued (monotonic), or None."""
        return self._deferred_since if self._deferred else None

    def run_deferred(self) -> int:
        """Run every deferred job now, on this thread; returns how many ran."""
        deferred = self._deferred
        ran = 0
        writer = getattr(self, "_writer", None)  # the writer's first call: not set yet
        on_writer = writer is not None and writer.is_writer_thread()
        with self._deferred_lock:  # also waits for a batch another thread is running
            while deferred:
                job = deferred.popleft()
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

    def now(self) -> dt.datetime:
        """The engine clock's current time as naive UTC."""
        value = self._clock()
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def add_listener(self, listener: Callable[[UsageRecord], None]) -> None:
        """Call ``listener(record)`` for every usage record, on the thread that finishes
        the call: the caller's for :meth:`settle` / :meth:`release` / :meth:`record`, the
        ledger writer's for work an adapter deferred (see :meth:`defer`)."""
        with self._lock:
            self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Callable[[UsageRecord], None]) -> None:
        with self._lock:
            # ``!=``, not ``is not``: each ``obj.method`` access is a new bound method
            self._listeners = [item for item in self._listeners if item != listener]

    # -- counting -------------------------------------------------------------------------
    def count_tokens(self, text: str, model: str) -> int:
        return count_tokens(text, model, catalog=self.catalog)

    def count_message_tokens(self, messages: Iterable[Mapping[str, Any]], model: str, *,
                             tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        return count_message_tokens(messages, model, tools=tools, catalog=self.catalog)

    def count_tool_tokens(self, tools: Sequence[Mapping[str, Any]], model: str) -> int:
        """Prompt tokens of OpenAI-format tool definitions sent with a call."""
        return count_tool_tokens(tools, model, catalog=self.catalog)

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
        ticket = self.ticket(
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
                self._finish(ticket, status="blocked", error_type=type(exc).__name__)
            raise
        return ticket

    def ticket(self, model: str, *, input_tokens: int | None = None,
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
        """A ticket for a call, like :meth:`admit` but checking no budget.

        For a call that has already happened (an adapter that does its bookkeeping after
        the call): settling it still counts its cost in every budget that applies.
        """
        price = self.catalog.get(model)
        text_for_hash: Callable[[], str] | None = None  # hashed when the row is built
        pending_count: Callable[[], int] | None = None
        if input_tokens is None:  # counted only if someone asks (a budget check may not)
            if messages is not None:
                messages = snapshot_messages(messages)
                text_for_hash = functools.partial(messages_text, messages)
                pending_count = functools.partial(self.count_message_tokens, messages,
                                                  model, tools=tools or None)
            elif prompt is not None:
                if not isinstance(prompt, str):
                    raise ConfigurationError(
                        f"prompt must be a str, got {type(prompt).__name__}")
                text_for_hash = functools.partial(str, prompt)
                pending_count = functools.partial(self.count_tokens, prompt, model)
            else:
                input_tokens = 0
        elif prompt is not None:
            text_for_hash = functools.partial(str, prompt)
        if input_tokens is not None and (type(input_tokens) is not int or input_tokens < 0):
            input_tokens = token_count("input_tokens", input_tokens)
        if max_output_tokens is None:
            max_output_tokens = self._default_output(price)
        elif type(max_output_tokens) is not int or max_output_tokens < 0:
            max_output_tokens = token_count("max_output_tokens", max_output_tokens)
        ticket = Ticket(
            new_id(), model, price, input_tokens, max_output_tokens,
            None if input_tokens is None else price.cost_nanos(input_tokens, max_output_tokens),
            operation_type=operation_type, provider=provider or price.provider,
            user_id=user_id, session_id=session_id, project=project or self.project,
            request_id=request_id, run_id=run_id, parent_run_id=parent_run_id,
            root_run_id=root_run_id or (run_id if parent_run_id is None else None),
            task_type=task_type, attempt=attempt, route_reason=route_reason,
            tags=tags if type(tags) is tuple else tuple(tags),
            metadata=dict(metadata) if metadata else {},
            prompt_hash=text_for_hash,
            prompt_preview=(redact_preview(text_for_hash())
                            if self.store_prompts and text_for_hash is not None else None),
            started=time.perf_counter(), pending_count=pending_count,
        )
        return ticket

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
        """A cheap upper bound of a prompt's tokens, for :meth:`AdmissionLane.admit`: the
        UTF-8 bytes of its text plus chat formatting (see ``message_tokens_bound``). None
        when it must be counted (tool calls, content parts)."""
        if messages is None:
            return text_tokens_bound(prompt) if prompt is not None else 0
        bound = message_tokens_bound(messages)
        if bound is not None and tools:
            # tool definitions are counted exactly (their parts' counts are cached)
            bound += self.count_tool_tokens(tools, model)
        return bound

    def _default_output(self, price: ModelPrice) -> int:
        """The output a call may run to when its caller sets no limit."""
        if price.mode == "embedding":
            return 0
        return price.max_output_tokens or self.default_max_output_tokens

    def lane(self, ticket: Ticket) -> AdmissionLane | None:
        """An admission lane for calls like ``ticket``, just admitted (same model and
        attribution): it admits them from leases without building a ticket first (see
        ``budgetkit.budgets._lane``). None when no budget is registered or such calls
        cannot be admitted in memory (per-run budgets, windows not looked up yet)."""
        if self._budgets is None:
            return None
        return self._budgets.lane(ticket, self._default_output(ticket.price),
                                  self._clock is _utcnow)

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
        if input_tokens is None:
            input_tokens = ticket.input_tokens
        if not (type(input_tokens) is int and type(output_tokens) is int
                and type(cached_input_tokens) is int and type(cache_write_tokens) is int
                and type(reasoning_tokens) is int and input_tokens >= 0 and output_tokens >= 0
                and cached_input_tokens >= 0 and cache_write_tokens >= 0
                and reasoning_tokens >= 0):  # NaN, inf, negatives: refused, named, no row
            input_tokens = token_count("input_tokens", input_tokens)
            output_tokens = token_count("output_tokens", output_tokens)
            cached_input_tokens = token_count("cached_input_tokens", cached_input_tokens)
            cache_write_tokens = token_count("cache_write_tokens", cache_write_tokens)
            reasoning_tokens = token_count("reasoning_tokens", reasoning_tokens)
        price = ticket.price
        if model and model != ticket.model:
            reported = self.catalog.resolve(model)
            if reported is not None:
                price = reported
        cost = price.cost_nanos(input_tokens, output_tokens,
                                cached_input_tokens=cached_input_tokens,
                                cache_write_tokens=cache_write_tokens)
        if metadata:
            ticket.metadata.update(metadata)
        return self._finish(ticket, status="ok", model=model or ticket.model,
                            input_tokens=input_tokens, output_tokens=output_tokens,
                            cached_input_tokens=cached_input_tokens,
                            cache_write_tokens=cache_write_tokens,
                            reasoning_tokens=reasoning_tokens, cost_nanos=cost,
                            usage_source=usage_source)

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
        if not (type(input_tokens) is int and type(output_tokens) is int
                and input_tokens >= 0 and output_tokens >= 0):
            input_tokens = token_count("input_tokens", input_tokens)
            output_tokens = token_count("output_tokens", output_tokens)
        error_type = (error if isinstance(error, str)
                      else type(error).__name__ if error is not None else None)
        cost = (ticket.price.cost_nanos(input_tokens, output_tokens)
                if input_tokens or output_tokens else 0)
        return self._finish(ticket, status=status, error_type=error_type,
                            input_tokens=input_tokens, output_tokens=output_tokens,
                            cost_nanos=cost, usage_source=usage_source)

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
        with self._lock:
            if ticket.done:
                return False
            ticket.done = True
        if self._budgets is not None:
            self._budgets.release(ticket)
        return True

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
        if not (type(input_tokens) is int and type(output_tokens) is int
                and type(cached_input_tokens) is int and type(cache_write_tokens) is int
                and type(reasoning_tokens) is int and type(saved_nanos) is int
                and input_tokens >= 0 and output_tokens >= 0 and cached_input_tokens >= 0
                and cache_write_tokens >= 0 and reasoning_tokens >= 0 and saved_nanos >= 0):
            input_tokens = token_count("input_tokens", input_tokens)
            output_tokens = token_count("output_tokens", output_tokens)
            cached_input_tokens = token_count("cached_input_tokens", cached_input_tokens)
            cache_write_tokens = token_count("cache_write_tokens", cache_write_tokens)
            reasoning_tokens = token_count("reasoning_tokens", reasoning_tokens)
            saved_nanos = nonnegative_int("saved_nanos", saved_nanos,
                                          what="a whole number of nano-dollars")
        if latency_ms is not None:
            latency_ms = finite_number("latency_ms", latency_ms)
        ticket = self._ticket_for_record(model, input_tokens, attribution)
        if created_at is not None:
            if created_at.tzinfo is not None:
                created_at = created_at.astimezone(dt.timezone.utc).replace(tzinfo=None)
            ticket.ended = (ticket.started, created_at)
        cost = 0
        if status == "ok":
            cost = ticket.price.cost_nanos(input_tokens, output_tokens,
                                           cached_input_tokens=cached_input_tokens,
                                           cache_write_tokens=cache_write_tokens)
        record = self._finish(ticket, status=status, input_tokens=input_tokens,
                              output_tokens=output_tokens,
                              cached_input_tokens=cached_input_tokens,
                              cache_write_tokens=cache_write_tokens,
                              reasoning_tokens=reasoning_tokens, cost_nanos=cost,
                              saved_nanos=saved_nanos, usage_source=usage_source,
                              latency_ms=latency_ms, error_type=error_type)
        assert record is not None
        return record

    def _ticket_for_record(self, model: str, input_tokens: int,
                           attribution: dict[str, Any]) -> Ticket:
        allowed = {"operation_type", "provider", "user_id", "session_id", "project",
                   "request_id", "run_id", "parent_run_id", "root_run_id", "task_type",
                   "attempt", "route_reason", "tags", "metadata", "prompt"}
        unknown = set(attribution) - allowed
        if unknown:
            raise ConfigurationError(
                f"unknown argument(s) to record(): {', '.join(sorted(unknown))}")
        price = self.catalog.get(model)
        prompt = attribution.pop("prompt", None)
        attribution.setdefault("operation_type", "chat_completion")
        attribution["tags"] = tuple(attribution.get("tags") or ())
        attribution["metadata"] = dict(attribution.get("metadata") or {})
        attribution["provider"] = attribution.get("provider") or price.provider
        attribution["project"] = attribution.get("project") or self.project
        return Ticket(id=new_id(), model=model, price=price, input_tokens=input_tokens,
                      max_output_tokens=0, worst_case_nanos=0,
                      prompt_hash=prompt_hash(prompt) if prompt is not None else None,
                      prompt_preview=(redact_preview(prompt)
                                      if self.store_prompts and prompt is not None else None),
                      started=time.perf_counter(), **attribution)

    def _finish(self, ticket: Ticket, *, status: str, model: str | None = None,
                input_tokens: int = 0, output_tokens: int = 0, cached_input_tokens: int = 0,
                cache_write_tokens: int = 0, reasoning_tokens: int = 0, cost_nanos: int = 0,
                saved_nanos: int = 0, usage_source: str = "provider",
                latency_ms: float | None = None,
                error_type: str | None = None) -> UsageRecord | None:
        with self._lock:  # exactly one row per ticket, whichever finisher comes first
            if ticket.done:
                return None
            ticket.done = True
        budgets = self._current_budgets() if status != "blocked" else None
        if budgets is not None:  # (also counts calls recorded without admit)
            if status in ("ok", "error"):
                budgets.commit(ticket, cost_nanos, input_tokens + output_tokens)
            else:
                budgets.release(ticket)
        ended = ticket.ended
        if latency_ms is None and status != "blocked":
            latency_ms = ((time.perf_counter() if ended is None else ended[0])
                          - ticket.started) * 1000.0
        if ended is not None:
            created_at = self.end_time(ended)
        else:
            created_at = _utcnow() if self._clock is _utcnow else self.now()
        # One dict holds the record's fields (a frozen dataclass's __init__ costs a
        # setattr per field: ~4 µs per call); the writer gets a copy whose metadata is a
        # snapshot, so a listener mutating ``record.metadata`` cannot change the row.
        values = {
            "id": ticket.id,
            "created_at": created_at,
            "model": model or ticket.model,
            "provider": ticket.provider, "operation_type": ticket.operation_type,
            "status": status, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "cached_input_tokens": cached_input_tokens,
            "cache_write_tokens": cache_write_tokens, "reasoning_tokens": reasoning_tokens,
            "total_tokens": input_tokens + output_tokens, "cost_nanos": cost_nanos,
            "saved_nanos": saved_nanos, "latency_ms": latency_ms,
            "usage_source": usage_source, "error_type": error_type,
            "user_id": ticket.user_id, "session_id": ticket.session_id,
            "project": ticket.project, "request_id": ticket.request_id,
            "run_id": ticket.run_id, "parent_run_id": ticket.parent_run_id,
            "root_run_id": ticket.root_run_id, "task_type": ticket.task_type,
            "attempt": ticket.attempt, "route_reason": ticket.route_reason,
            "tags": ticket.tags, "metadata": ticket.metadata,
            "prompt_hash": ticket.prompt_hash, "prompt_preview": ticket.prompt_preview,
        }
        record = UsageRecord._from_fields(values)
        row = values.copy()
        metadata: Any = values["metadata"]
        row["metadata"] = dict(metadata) if metadata else {}
        self._writer.submit(row)
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a listener's bug must not break the user's call
                logger.exception("budgetkit: usage listener %r failed", listener)
        return record

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
