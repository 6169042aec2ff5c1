"""What both LlamaIndex handlers share: reading usage, attribution, pending calls, totals.

A "call" is keyed by the framework's id for it (a span id on the instrumentation path, an
event id on the legacy path). Only the *outermost* LLM call in a context is recorded:
``CustomLLM.chat`` (``MockLLM`` among others) calls ``complete`` inside, and both fire
events for what is one provider call; LlamaIndex's own ``TokenCountingHandler`` counts it
twice.

Calls recorded elsewhere are skipped: calls made while ``budgetkit.routing.is_metered_call()``
is true (budgetkit's routed LLM admitted them itself), and responses marked
``additional_kwargs["budgetkit_cache_hit"]`` (the cache wrote its own ``cached`` row) or
``["budgetkit_routed"]`` (a wrapper whose inner call is the real one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from budgetkit import ConfigurationError, Engine, UnknownModelError
from budgetkit.budgets import LaneReservation, Lanes
from budgetkit.routing import is_metered_call
from budgetkit.ledger import Ticket, UsageRecord
from budgetkit.ledger import Usage

from ._context import ATTRIBUTION_KEYS, current_attribution
from ._fitting import to_openai_message
from ._runs import RunIds

logger = logging.getLogger("budgetkit.llama_index")

_RECORDED_ELSEWHERE = ("budgetkit_cache_hit", "budgetkit_routed")

# The key of the outermost open LLM call of this context, per handler (see module docs).
_open_call: ContextVar[dict[int, str] | None] = ContextVar("budgetkit_llama_open_call",
                                                           default=None)


def _lane_key(model: str, kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """What decides a call's budget windows: calls with the same key share a lane."""
    return (model, kwargs.get("provider"), kwargs.get("user_id"), kwargs.get("project"),
            kwargs.get("operation_type"), tuple(kwargs.get("tags") or ()))


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_raw(raw: Any, additional_kwargs: Mapping[str, Any] | None = None) -> Usage | None:
    """Provider usage from a LlamaIndex response's ``raw`` (or ``additional_kwargs``).

    OpenAI-style ``usage`` (``prompt_tokens_details.cached_tokens``,
    ``completion_tokens_details.reasoning_tokens``) and Anthropic-style usage
    (``input_tokens`` excluding ``cache_read_input_tokens`` / ``cache_creation_input_tokens``)
    are both converted to budgetkit's convention: details are parts of the totals.
    """
    usage = _get(raw, "usage")
    if usage is None:
        usage = _get(raw, "usage_metadata")
    if usage is not None:
        prompt = _int(_get(usage, "prompt_tokens"))
        completion = _int(_get(usage, "completion_tokens"))
        if prompt or completion:
            cached = _int(_get(_get(usage, "prompt_tokens_details"), "cached_tokens"))
            written = _int(_get(_get(usage, "prompt_tokens_details"), "cache_write_tokens"))
            reasoning = _int(_get(_get(usage, "completion_tokens_details"), "reasoning_tokens"))
            cached = min(cached, prompt)
            return Usage(prompt, completion, cached, min(written, prompt - cached),
                         min(reasoning, completion))
        plain = _int(_get(usage, "input_tokens"))
        output = _int(_get(usage, "output_tokens"))
        if plain or output:  # Anthropic: input_tokens excludes cache reads and writes
            read = _int(_get(usage, "cache_read_input_tokens"))
            written = _int(_get(usage, "cache_creation_input_tokens"))
            return Usage(plain + read + written, output, read, written)
    if additional_kwargs:
        prompt = _int(additional_kwargs.get("prompt_tokens"))
        completion = _int(additional_kwargs.get("completion_tokens"))
        if prompt or completion:
            return Usage(prompt, completion)
    return None


def response_model(raw: Any) -> str | None:
    model = _get(raw, "model")
    return model if isinstance(model, str) and model else None


def to_openai_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """LlamaIndex ``ChatMessage`` objects → OpenAI-format dicts for token counting.

    One converter serves tracking, caching, routing and fitting, so a prompt is counted the
    same way everywhere (tool calls and tool results included).
    """
    return [to_openai_message(message) for message in messages]


@dataclass(slots=True)
class _Call:
    model: str | None
    kwargs: dict[str, Any]
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    ticket: Ticket | None = None
    chunks: list[str] = field(default_factory=list)
    usage: Usage | None = None  # usage seen on a stream chunk before the end
    #: admitted in an admission lane: its reservation, and what builds its ticket at the end
    held: LaneReservation | None = None
    admit_kwargs: dict[str, Any] | None = None


class Tracker:
    """Pending calls, attribution and running totals for one handler."""

    def __init__(self, engine: Engine, *, user_id: str | None = None,
                 session_id: str | None = None, project: str | None = None,
                 task_type: str | None = None, tags: Sequence[str] = (),
                 metadata: Mapping[str, Any] | None = None) -> None:
        if not isinstance(engine, Engine):
            raise ConfigurationError(
                f"engine must be a budgetkit.Engine, got {type(engine).__name__}")
        self.engine = engine
        self._defaults = {key: value for key, value in (
            ("user_id", user_id), ("session_id", session_id), ("project", project),
            ("task_type", task_type)) if value is not None}
        self._tags = tuple(tags)
        self._metadata = dict(metadata or {})
        self._calls: dict[str, _Call] = {}
        #: admission lanes by what decides a call's budget windows (see _lane_key)
        self._lanes = Lanes(engine)
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_nanos = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cost(self) -> float:
        return self.cost_nanos / 1e9

    def _count(self, record: UsageRecord | None) -> None:
        if record is not None:
            with self._lock:
                self.calls += 1
                self.input_tokens += record.input_tokens
                self.output_tokens += record.output_tokens
                self.cost_nanos += record.cost_nanos

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # -- attribution ------------------------------------------------------------------
    def attribution(self, key: str, operation_type: str,
                    event_tags: Mapping[str, Any] | None = None,
                    run: RunIds | None = None) -> dict[str, Any]:
        """Row fields of call ``key``; ``run`` places it in its query / chat / agent run
        (without it the call is its own run of unknown parent)."""
        scoped = current_attribution()
        fields: dict[str, Any] = {"operation_type": operation_type, **self._defaults}
        for source in (scoped, event_tags or {}):
            for name in ATTRIBUTION_KEYS:
                value = source.get(name)
                if value is not None:
                    fields[name] = str(value)
        tags = self._tags + tuple(tag for tag in scoped.get("tags", ()) if tag not in self._tags)
        metadata = {**self._metadata, **scoped.get("metadata", {})}
        run_ids = (run or RunIds(key, None, None)).as_kwargs()
        return dict(fields, **run_ids, tags=tags, metadata=metadata)

    # -- nesting --------------------------------------------------------------------------
    def enter(self, key: str) -> bool:
        """Mark ``key`` as this context's open LLM call; ``False`` if it is nested in one."""
        if is_metered_call():
            return False
        open_calls = _open_call.get()
        outer = open_calls.get(id(self)) if open_calls else None
        if outer is not None and outer in self._calls:
            return False
        _open_call.set({**(open_calls or {}), id(self): key})
        return True

    # -- the life of a call -------------------------------------------------------------
    def begin(self, key: str, model: str | None, kwargs: dict[str, Any], *,
              messages: list[dict[str, Any]] | None = None, prompt: str | None = None,
              admit: bool, max_output_tokens: int | None = None) -> None:
        call = _Call(model=model, kwargs=kwargs, messages=messages, prompt=prompt)
        if admit and model:
            admit_kwargs = dict(kwargs)
            if messages is not None:
                admit_kwargs["messages"] = messages
            else:
                admit_kwargs["prompt"] = prompt or ""
            if max_output_tokens:
                admit_kwargs["max_output_tokens"] = max_output_tokens
            lane_key = _lane_key(model, admit_kwargs)
            if not self._admit_in_lane(call, model, lane_key, admit_kwargs):
                try:
                    call.ticket = self.engine.admit(model, **admit_kwargs)
                except UnknownModelError as exc:
                    self.warn_once(f"unknown:{model}", "budgetkit: %s (calls are recorded only "
                                   "if the response names a priced model)", exc)
                else:
                    self._lanes.remember(lane_key, call.ticket)
        self._calls[key] = call

    # -- admission lanes (see budgetkit.budgets._lane) -----------------------------------
    def _admit_in_lane(self, call: _Call, model: str, key: tuple[Any, ...],
                       admit_kwargs: dict[str, Any]) -> bool:
        """Admit a call like the last one admitted in full (no ticket built, no database);
        False: admit it the ordinary way."""
        lane = self._lanes.get(key)
        if lane is None:
            return False
        bound = self.engine.prompt_bound(model, messages=call.messages, prompt=call.prompt
                                         if call.messages is None else None)
        if bound is None:
            return False
        call.held = lane.admit(bound, admit_kwargs.get("max_output_tokens"))
        if call.held is None:
            return False
        call.admit_kwargs = admit_kwargs
        return True

    def _ticket_of(self, call: _Call) -> None:
        """Build the ticket of a call admitted in a lane; it takes over the reservation."""
        held, call.held = call.held, None
        if held is None:
            return
        if call.model is None:  # (lanes admit only named models: cannot happen)
            held.give_back()
            return
        try:
            call.ticket = held.attach(self.engine.ticket(call.model, **call.admit_kwargs or {}))
        except BaseException:
            held.give_back()
            raise

    def progress(self, key: str, delta: str | None, raw: Any) -> None:
        call = self._calls.get(key)
        if call is None:
            return
        if delta:
            call.chunks.append(delta)
        usage = usage_from_raw(raw)
        if usage is not None:
            call.usage = usage

    def finish(self, key: str, *, text: str | None, raw: Any,
               additional_kwargs: Mapping[str, Any] | None) -> None:
        call = self._calls.pop(key, None)
        if call is None:
            return
        self._ticket_of(call)
        if additional_kwargs and any(additional_kwargs.get(mark) for mark in _RECORDED_ELSEWHERE):
            if call.ticket is not None:
                self.engine.discard(call.ticket)
            return
        usage = usage_from_raw(raw, additional_kwargs) or call.usage
        model = response_model(raw) or call.model
        source: Literal["provider", "estimated"] = "provider"
        if usage is None:
            usage = self._estimate(call, model, text)
            source = "estimated"
        if usage is None or not model:
            self.warn_once("llm:no-model", "budgetkit: an LLM call names no model (its "
                           "metadata.model_name is unknown); not recorded")
            return
        try:
            if call.ticket is not None:
                self._count(self.engine.settle(call.ticket, model=model, usage_source=source,
                                               **usage.settle_kwargs()))
            else:
                self._count(self.engine.record(model, usage_source=source, **call.kwargs,
                                               **usage.settle_kwargs()))
        except UnknownModelError as exc:
            self.warn_once(f"unknown:{exc.model}", "budgetkit: not recording calls to %r: %s",
                           exc.model, exc)

    def fail(self, key: str, error: BaseException | None) -> None:
        call = self._calls.pop(key, None)
        if call is None:
            return
        self._ticket_of(call)
        if call.ticket is not None:
            partial = "".join(call.chunks)
            if partial:  # streamed output is billed even when the stream breaks
                self._count(self.engine.release(
                    call.ticket, error=error, input_tokens=call.ticket.input_tokens,
                    output_tokens=self.engine.count_tokens(partial, call.ticket.model)))
            else:
                self._count(self.engine.release(call.ticket, error=error))
        elif call.model:
            try:
                self._count(self.engine.record(
                    call.model, input_tokens=0, status="error",
                    error_type=type(error).__name__ if error is not None else None,
                    usage_source="estimated", **call.kwargs))
            except UnknownModelError:
                pass

    def _estimate(self, call: _Call, model: str | None, text: str | None) -> Usage | None:
        counting = (call.ticket.model if call.ticket is not None else model)
        if not counting:
            return None
        if call.ticket is not None:
            input_tokens = call.ticket.input_tokens
        elif call.messages is not None:
            input_tokens = self.engine.count_message_tokens(call.messages, counting)
        else:
            input_tokens = self.engine.count_tokens(call.prompt or "", counting)
        output = text if text else "".join(call.chunks)
        return Usage(input_tokens, self.engine.count_tokens(output, counting) if output else 0)

    def embedding(self, key: str, model: str | None, chunks: Sequence[str],
                  operation_type: str, event_tags: Mapping[str, Any] | None = None,
                  run: RunIds | None = None) -> None:
        """Record one embedding call (tokens counted: LlamaIndex reports none)."""
        if not model:
            self.warn_once("embedding:no-model", "budgetkit: an embedding call names no "
                           "model; not recorded")
            return
        try:
            tokens = sum(self.engine.count_tokens(chunk, model) for chunk in chunks)
            self._count(self.engine.record(model, input_tokens=tokens,
                                           usage_source="estimated",
                                           **self.attribution(key, operation_type, event_tags,
                                                             run)))
        except UnknownModelError as exc:
            self.warn_once(f"unknown:{model}", "budgetkit: not recording embeddings of %r: %s",
                           model, exc)


class TrackerTotals:
    """The running totals both handlers expose, read from their ``_tracker``."""

    _tracker: Tracker

    @property
    def engine(self) -> Engine:
        return self._tracker.engine

    @property
    def calls(self) -> int:
        return self._tracker.calls

    @property
    def input_tokens(self) -> int:
        return self._tracker.input_tokens

    @property
    def output_tokens(self) -> int:
        return self._tracker.output_tokens

    @property
    def total_tokens(self) -> int:
        return self._tracker.total_tokens

    @property
    def cost(self) -> float:
        return self._tracker.cost


def log_failure(where: str) -> None:
    # A bug in tracking must not break the user's call: report it and carry on.
    logger.exception("budgetkit: tracking failed in %s; the call continues untracked", where)
