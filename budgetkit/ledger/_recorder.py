"""Calls into usage rows: the ledger's service for one call.

:class:`UsageRecorder` builds a call's :class:`Ticket` (attributed, priced at its worst
case, its prompt counted and hashed only when someone asks), prices what the call really
used, and ends each ticket in exactly one usage row, whichever of ``settle``, ``release``,
``discard`` comes first. The row goes to ``submit`` (the batch writer) and the record to
the listeners.

It knows nothing of budgets: ``budgets()`` returns what a finished call is counted in
(anything with ``commit(ticket, cost_nanos, tokens)`` and ``release(ticket)``, the budget
book in an :class:`~budgetkit.Engine`), or None. Usable alone::

    rows = []
    recorder = UsageRecorder(rows.append)
    ticket = recorder.ticket("gpt-4o-mini", prompt="hello")
    recorder.settle(ticket, input_tokens=8, output_tokens=20)   # rows[0] is its usage row

This is the hot path ``benchmarks/bench_handler_overhead.py`` measures: validation is one
type check per argument unless something is wrong, and a record's fields are built once.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

from budgetkit.errors import ConfigurationError
from budgetkit.pricing import (
    ModelPrice,
    PriceCatalog,
    count_message_tokens,
    count_tokens,
    count_tool_tokens,
    default_catalog,
    finite_number,
    message_tokens_bound,
    nonnegative_int,
    text_tokens_bound,
    token_count,
)

from ._ticket import (
    Ticket,
    UsageRecord,
    messages_text,
    new_id,
    prompt_hash,
    redact_preview,
    snapshot_messages,
)

__all__ = ["CallCounter", "UsageRecorder", "UsageSource", "Status", "utcnow"]

logger = logging.getLogger("budgetkit")

UsageSource = Literal["provider", "estimated"]
Status = Literal["ok", "error", "cached", "blocked"]

_EPOCH = dt.datetime(1970, 1, 1)


def utcnow() -> dt.datetime:
    """Now as naive UTC (half the cost of ``datetime.now(timezone.utc)`` and dropping
    the zone: this runs on every call)."""
    return _EPOCH + dt.timedelta(seconds=time.time())


class CallCounter(Protocol):
    """What a finished call's cost is counted in (the budget book)."""

    def commit(self, ticket: Any, cost_nanos: int, tokens: int) -> None: ...

    def release(self, ticket: Any) -> None: ...


def _no_budgets() -> CallCounter | None:
    return None


def _nowhere(row: dict[str, Any]) -> None:
    raise RuntimeError("this UsageRecorder has nowhere to send rows: give it submit=")


class UsageRecorder:
    """Tickets in, one usage row per ticket out (see the module's docstring).

    ``submit(row)`` takes each row (a dict of ``UsageRow`` fields; an engine sets it to its
    batch writer's once that is built, so a bad argument here starts no thread).
    ``clock`` returns the current time as a timezone-aware or naive-UTC datetime (tests
    inject a fake one).
    ``store_prompts`` keeps a redacted 200-character preview of each prompt.
    """

    DEFAULT_MAX_OUTPUT = 4096  # worst case reserved when neither caller nor catalog says

    def __init__(self, submit: Callable[[dict[str, Any]], None] = _nowhere, *,
                 catalog: PriceCatalog | None = None, project: str | None = None,
                 store_prompts: bool = False,
                 default_max_output_tokens: int = DEFAULT_MAX_OUTPUT,
                 clock: Callable[[], dt.datetime] = utcnow,
                 budgets: Callable[[], CallCounter | None] = _no_budgets) -> None:
        if default_max_output_tokens <= 0:
            raise ConfigurationError(
                f"default_max_output_tokens must be > 0, got {default_max_output_tokens}")
        self.catalog = catalog if catalog is not None else default_catalog().copy()
        self.project = project
        self.store_prompts = store_prompts
        self.default_max_output_tokens = default_max_output_tokens
        self.submit = submit
        self._clock = clock
        self._budgets = budgets
        self._lock = threading.Lock()
        self._listeners: list[Callable[[UsageRecord], None]] = []

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    # -- time ---------------------------------------------------------------------------
    @property
    def wall_clock(self) -> bool:
        """Whether the clock is the wall clock (not one a test injected)."""
        return self._clock is utcnow

    def now(self) -> dt.datetime:
        """The clock's current time as naive UTC."""
        value = self._clock()
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def mark_end(self) -> tuple[float, dt.datetime | float]:
        """The moment a call ended, for :attr:`Ticket.ended` (latency and row time): the
        ``perf_counter`` and the clock's time. With the wall clock the time is
        ``time.time()`` seconds, made a datetime only when the row is built (this runs on
        the caller's thread); :meth:`end_time` reads it."""
        if self._clock is utcnow:
            return time.perf_counter(), time.time()
        return time.perf_counter(), self.now()

    @staticmethod
    def end_time(mark: tuple[float, dt.datetime | float]) -> dt.datetime:
        """The naive-UTC datetime of a :meth:`mark_end` mark."""
        moment = mark[1]
        if isinstance(moment, float):
            return _EPOCH + dt.timedelta(seconds=moment)
        return moment

    # -- listeners ----------------------------------------------------------------------
    def add_listener(self, listener: Callable[[UsageRecord], None]) -> None:
        """Call ``listener(record)`` for every usage record, on the thread that ends the
        ticket."""
        with self._lock:
            self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Callable[[UsageRecord], None]) -> None:
        with self._lock:
            # ``!=``, not ``is not``: each ``obj.method`` access is a new bound method
            self._listeners = [item for item in self._listeners if item != listener]

    # -- counting and tickets -----------------------------------------------------------
    def count_tokens(self, text: str, model: str) -> int:
        return count_tokens(text, model, catalog=self.catalog)

    def count_message_tokens(self, messages: Iterable[Mapping[str, Any]], model: str, *,
                             tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        return count_message_tokens(messages, model, tools=tools, catalog=self.catalog)

    def count_tool_tokens(self, tools: Sequence[Mapping[str, Any]], model: str) -> int:
        """Prompt tokens of OpenAI-format tool definitions sent with a call."""
        return count_tool_tokens(tools, model, catalog=self.catalog)

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
        """A ticket for a call: priced at its worst case, attributed, its prompt kept to
        be counted and hashed when someone asks. Checks no budget (see ``Engine.admit``).

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
            max_output_tokens = self.default_output(price)
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

    def prompt_bound(self, model: str, *, messages: Sequence[Mapping[str, Any]] | None = None,
                     prompt: str | None = None,
                     tools: Sequence[Mapping[str, Any]] | None = None) -> int | None:
        """A cheap upper bound of a prompt's tokens, for ``AdmissionLane.admit``: the
        UTF-8 bytes of its text plus chat formatting (see ``message_tokens_bound``). None
        when it must be counted (tool calls, content parts)."""
        if messages is None:
            return text_tokens_bound(prompt) if prompt is not None else 0
        bound = message_tokens_bound(messages)
        if bound is not None and tools:
            # tool definitions are counted exactly (their parts' counts are cached)
            bound += self.count_tool_tokens(tools, model)
        return bound

    def default_output(self, price: ModelPrice) -> int:
        """The output a call may run to when its caller sets no limit."""
        if price.mode == "embedding":
            return 0
        return price.max_output_tokens or self.default_max_output_tokens

    def block(self, ticket: Ticket, error_type: str) -> UsageRecord | None:
        """End a ticket a budget refused: a ``blocked`` row, no cost, nothing counted."""
        return self._finish(ticket, status="blocked", error_type=error_type)

    # -- ending a ticket ----------------------------------------------------------------
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

    def discard(self, ticket: Ticket) -> bool:
        """End a ticket *without* a usage row, returning its reservations.

        For calls that another component records itself (a response-cache hit writes its
        own ``cached`` row). Returns ``False`` if the ticket was already finished.
        """
        with self._lock:
            if ticket.done:
                return False
            ticket.done = True
        budgets = self._budgets()
        if budgets is not None:
            budgets.release(ticket)
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
        ``attribution`` takes the keyword arguments of :meth:`ticket`. Counts must be whole
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
        budgets = self._budgets() if status != "blocked" else None
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
            created_at = utcnow() if self._clock is utcnow else self.now()
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
        self.submit(row)
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a listener's bug must not break the user's call
                logger.exception("budgetkit: usage listener %r failed", listener)
        return record
