"""LangChain callback handlers that record every chat-model and LLM call in a budgetkit ledger.

    engine = budgetkit.Engine()
    handler = BudgetkitCallbackHandler(engine, user_id="alice", project="support-bot")
    chain.invoke(question, config={"callbacks": [handler]})

The life of one model run, by LangChain event:

- ``on_chat_model_start`` / ``on_llm_start``: when the engine has budgets (or
  ``strict_models`` is set), the prompt is converted to OpenAI-format messages and the
  engine *admits* the call (counts the prompt, prices the worst case, checks budgets). A
  :class:`budgetkit.BudgetExceeded` propagates (the handler has ``raise_error = True``), so
  the provider is never called; the engine has already written the ``blocked`` row.
  Without budgets nothing needs deciding before the call, so the handler only notes the
  run (its prompt, metadata and start time).
- ``on_llm_new_token``: streamed text is kept (for the estimate below) and, when the engine
  offers ``check_stream``, the budget is checked as tokens arrive; its
  ``BudgetExceeded`` cuts the stream. A chunk's ``usage_metadata``, when it has one, is
  kept too: at the end, chunks that report *running totals* (vLLM's continuous usage
  stats and other OpenAI-compatible servers, LangChain #30429) are recorded with the last
  totals rather than LangChain's sum of them (see ``_stream_usage``).
- ``on_llm_end``: the run is handed to :meth:`budgetkit.Engine.defer` with the moment it
  ended; off the caller's thread, the provider's ``usage_metadata`` (cache reads, cache
  writes and reasoning tokens included) settles the ticket, priced as the model the
  response names, and the row gets the call's real latency and end time. (LLM apps' threads
  mostly wait on the network, where this work costs them nothing; ``engine.flush()``,
  reading the handler's totals and exit run whatever is still waiting.) Without
  usage (some streams, fakes) the tokenizer counts the prompt and the output and the row
  says ``usage_source="estimated"`` and why (metadata ``usage_estimate_reason``: for a
  ChatOpenAI stream, that the model needs ``stream_usage=True``, which a callback cannot
  add to a request it only observes; RoutedChatModel asks for it itself).
- ``on_llm_error``: the reservation is returned; the row has status ``error`` and costs
  nothing unless output was already streamed (then input and partial output are billed,
  estimated).

Tracking never breaks a call for its own sake: only budget decisions propagate. Anything
else that goes wrong in the handler (including a model the catalog does not price) is
logged, once per kind, and the call goes on. An unpriced model is not recorded as a silent
$0: it is recorded at the catalog's ``fallback`` price when one is set, otherwise skipped
with a warning (or raised, with ``strict_models=True``).

Calls recorded elsewhere are skipped: runs of budgetkit's routed model (metadata or
``response_metadata`` key ``budgetkit_routed``; its inner runs are the real calls) and inner
runs that model already metered (metadata ``budgetkit_metered``, or made while
``budgetkit.routing._cascade.is_metered_call()`` is true).

Cache hits: LangChain replays a cached generation through ``on_llm_end`` with its
original usage and ``usage_metadata["total_cost"] == 0``. A hit served by budgetkit's own
cache carries ``"budgetkit_cache_hit": True`` in ``response_metadata`` / ``generation_info``;
that cache writes its own ``cached`` row, so the handler only returns the ticket's
reservation (:meth:`Engine.discard`). Hits from any other LangChain cache are recorded by
the handler as ``cached`` rows with zero cost and the money they saved.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tracers.context import register_configure_hook

from budgetkit import BudgetExceeded, ContextWindowExceeded, Engine, UnknownModelError
from budgetkit.routing import is_metered_call
from budgetkit.budgets import LaneReservation, Lanes
from budgetkit.ledger import Ticket, UsageRecord
from budgetkit.pricing import text_tokens_bound
from budgetkit.ledger import Usage

from ._messages import message_text, prompt_tokens_bound, to_openai_messages
from ._stream_usage import ESTIMATE_REASON_KEY, ChunkUsage, usage_of_running_totals
from ._usage_parse import (first_value, json_safe, tool_call_text, usage_from_metadata,
                           usage_from_openai)

__all__ = ["BudgetkitCallbackHandler", "get_budgetkit_callback", "usage_from_metadata"]

logger = logging.getLogger("budgetkit.langchain")

#: Decisions of the engine that must stop the user's call; everything else is logged.
_STOPS = (BudgetExceeded, ContextWindowExceeded)
# The attribution of the model run that started last in this context. LangChain asks its
# cache right after on_chat_model_start / on_llm_start, in the same thread or task, but
# gives the cache no run context: BudgetkitCache reads this to attribute a hit's row to the
# run's user, project and run ids.
_CALL_KEYS = ("operation_type", "user_id", "session_id", "project", "request_id", "run_id",
              "parent_run_id", "root_run_id", "tags", "metadata")


class _Call:
    """A started model run, for attribution. Ending the run marks the object rather than
    resetting the variable: LangChain ends async runs inside child tasks (copied contexts),
    where a reset would not reach the caller's context, but the shared object's mark does."""

    __slots__ = ("run_id", "run", "tracker", "ended")

    def __init__(self, run_id: UUID, run: _Run, tracker: _Tracker) -> None:
        self.run_id, self.run, self.tracker, self.ended = run_id, run, tracker, False


_current_call: ContextVar[_Call | None] = ContextVar("budgetkit_current_call", default=None)
# Set once a BudgetkitCache exists (the only reader): until then runs skip the context.
_attribution_wanted = False


def want_call_attribution() -> None:
    """From now on, note each starting run for :func:`current_call_attribution`."""
    global _attribution_wanted
    _attribution_wanted = True


def current_call_attribution() -> dict[str, Any]:
    """Attribution of the model run being started in this context ({} outside one)."""
    current = _current_call.get()
    if current is None or current.ended:
        return {}
    try:  # worked out here, off the per-call path (most calls never ask)
        kwargs = current.tracker._resolve(current.run_id, current.run)
    except Exception:
        _log_failure("attribution")
        return {}
    return {key: kwargs[key] for key in _CALL_KEYS if key in kwargs}


def _leave_call(run_id: UUID) -> None:
    if not _attribution_wanted:
        return
    current = _current_call.get()
    if current is not None and current.run_id == run_id:
        current.ended = True


_ATTRIBUTION_KEYS = frozenset(("user_id", "session_id", "project", "operation_type",
                               "task_type", "request_id"))
#: Marks budgetkit's routed model puts on the inner runs it leaves to this handler: they are
#: columns of the row (why this model ran, which attempt), not free metadata. Kept out of the
#: lane key: a reason differs per call and would split the lanes.
_ROUTE_KEYS = frozenset(("route_reason", "attempt"))
_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens",
                   "max_new_tokens", "num_predict", "maxOutputTokens")
_MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name", "azure_deployment")
_OPENAI_TYPES = frozenset({"openai-chat", "azure-openai-chat"})  # ChatOpenAI, AzureChatOpenAI


def _estimate_reason(run: _Run) -> str:
    """Why a run's usage had to be counted (the row's ``usage_estimate_reason``)."""
    if run.chunks is None:
        return "the response reported no usage"
    if run.openai_compatible:
        # A callback only observes the request: it cannot add stream_options to it.
        return ("the stream reported no usage; create the model with stream_usage=True "
                "(ChatOpenAI sends stream_options={'include_usage': true} then) for "
                "the provider's figures")
    return "the stream reported no usage"
_CACHE_MARK = "budgetkit_cache_hit"
#: A run of budgetkit's routed model (its cost is recorded on its inner runs) and an inner
#: run that model has already recorded itself (see langchain_budgetkit._routed).
_ROUTED_MARK = "budgetkit_routed"
_METERED_MARK = "budgetkit_metered"


# ---------------------------------------------------------------------------- run state

@dataclass(slots=True)
class _Run:
    """A model run between its start and its end: what LangChain gave at the start (read
    when the run is resolved, usually off the caller's thread) and what was decided."""

    operation_type: str
    parent_run_id: UUID | None
    root_run_id: UUID
    tags: list[str] | None
    metadata: dict[str, Any] | None
    model: str | None
    max_tokens: int | None
    tools: Any  # OpenAI-format tool definitions sent with the prompt (bind_tools), or None
    prompt: Sequence[BaseMessage] | str
    started: float
    ticket: Ticket | None = None
    #: the admit keyword arguments, once resolved (see _Tracker._resolve)
    kwargs: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None  # the prompt as OpenAI-format messages
    prompt_text: str | None = None  # the prompt of a completion LLM
    #: set when the catalog could not price the start model: recorded at the end if the
    #: response names a model it can price
    deferred: dict[str, Any] | None = None
    chunks: list[str] | None = None  # streamed text (None until a token arrives)
    stream_tokens: int = 0
    #: the streamed chunks' usage_metadata (None until a chunk reports one)
    chunk_usage: list[ChunkUsage] | None = None
    task: Any = None  # the asyncio task running the call (async path), watched for cancel
    on_done: Any = None
    #: what an admission lane reserved at the start (the ticket is built at the end)
    held: LaneReservation | None = None
    #: an OpenAI-compatible LangChain model (invocation params ``_type``): its stream
    #: reports usage when the model is created with ``stream_usage=True``
    openai_compatible: bool = False


class _Facts:
    """What the end of a run said, taken on the caller's thread: the few dicts the
    bookkeeping reads, not LangChain's response objects (held until the deferred work
    runs, those would outlive the garbage collector's young generation). Taken now also
    because LangChain's cache replaces a shared generation's message on a later hit (to
    zero its cost), which must not turn this call into a hit."""

    __slots__ = ("chat", "response_metadata", "generation_info", "llm_output",
                 "usage_metadata", "response")

    chat: bool  # a chat model's run (its first generation carries a message)
    response_metadata: dict[str, Any]
    generation_info: dict[str, Any]
    llm_output: dict[str, Any]
    usage_metadata: Any
    response: LLMResult | None  # kept only when the call must be estimated from its text

    @classmethod
    def of(cls, response: LLMResult) -> _Facts:
        facts = cls()
        generations = response.generations
        generation = (generations[0][0] if generations and generations[0]
                      else next((gen for gens in generations for gen in gens), None))
        message = generation.message if isinstance(generation, ChatGeneration) else None
        facts.chat = message is not None
        facts.response_metadata = (message.response_metadata if message is not None
                                   else None) or {}
        facts.generation_info = (generation.generation_info if generation is not None
                                 else None) or {}
        facts.llm_output = response.llm_output or {}
        usage = facts.usage_metadata = getattr(message, "usage_metadata", None)
        # The text is needed only to estimate a call that reported no usage.
        reported = (usage and (usage.get("input_tokens") or usage.get("output_tokens"))) \
            or facts.llm_output.get("token_usage") or facts.llm_output.get("usage") \
            or facts.generation_info.get("usage")
        facts.response = None if reported else response
        return facts


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What to tell the engine at a run's end."""

    action: str  # "settle" | "discard" | "record" | "release"
    ticket: Ticket | None = None
    model: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


class _Totals:
    """Running totals of the calls a handler recorded."""

    __slots__ = ("calls", "input_tokens", "output_tokens", "cached_input_tokens",
                 "reasoning_tokens", "cost_nanos", "usage_by_model")

    def __init__(self) -> None:
        self.calls = self.input_tokens = self.output_tokens = 0
        self.cached_input_tokens = self.reasoning_tokens = self.cost_nanos = 0
        self.usage_by_model: dict[str, dict[str, int]] = {}


def _total(name: str) -> property:
    def read(self: _Tracker) -> Any:
        self.engine.run_deferred()  # calls that ended but are not counted yet
        return getattr(self._totals, name)

    return property(read, doc=f"Running total: {name.replace('_', ' ')}.")


class _Tracker:
    """The framework-event logic both handlers share."""

    def __init__(self, engine: Engine, *, user_id: str | None = None,
                 session_id: str | None = None, project: str | None = None,
                 operation_type: str | None = None, task_type: str | None = None,
                 tags: Sequence[str] = (), metadata: Mapping[str, Any] | None = None,
                 strict_models: bool = False) -> None:
        if not isinstance(engine, Engine):
            from budgetkit import ConfigurationError

            raise ConfigurationError(
                f"engine must be a budgetkit.Engine, got {type(engine).__name__}")
        self.engine = engine
        self.defaults = {"user_id": user_id, "session_id": session_id, "project": project,
                         "operation_type": operation_type, "task_type": task_type}
        self._default_attribution = [(key, value) for key, value in self.defaults.items()
                                     if value is not None and key != "operation_type"]
        # Each run's attribution starts as a copy of one of these (per kind of call).
        self._base_kwargs = {kind: {"operation_type": operation_type or kind,
                                    **dict(self._default_attribution)}
                             for kind in ("chat_completion", "text_generation")}
        self.tags = tuple(tags)
        self.metadata = dict(metadata or {})
        self.strict_models = strict_models
        self._runs: dict[UUID, _Run] = {}
        #: admission lanes by what decides a call's budget windows (see _lane_key)
        self._lanes = Lanes(engine)
        self._roots: dict[UUID, UUID] = {}  # run id -> root run id, for runs still open
        self._warned: set[str] = set()
        self._totals_lock = threading.Lock()
        self._totals = _Totals()

    # -- running totals -------------------------------------------------------------------
    calls = _total("calls")
    input_tokens = _total("input_tokens")
    output_tokens = _total("output_tokens")
    cached_input_tokens = _total("cached_input_tokens")
    reasoning_tokens = _total("reasoning_tokens")
    cost_nanos = _total("cost_nanos")
    usage_by_model = _total("usage_by_model")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cost(self) -> float:
        """Money recorded through this handler, in USD."""
        return self.cost_nanos / 1e9

    def _count(self, record: UsageRecord | None) -> None:
        if record is None:
            return
        with self._totals_lock:
            totals = self._totals
            totals.calls += 1
            totals.input_tokens += record.input_tokens
            totals.output_tokens += record.output_tokens
            totals.cached_input_tokens += record.cached_input_tokens
            totals.reasoning_tokens += record.reasoning_tokens
            totals.cost_nanos += record.cost_nanos
            per_model = totals.usage_by_model.get(record.model)
            if per_model is None:
                per_model = totals.usage_by_model[record.model] = {
                    "calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_nanos": 0}
            per_model["calls"] += 1
            per_model["input_tokens"] += record.input_tokens
            per_model["output_tokens"] += record.output_tokens
            per_model["cost_nanos"] += record.cost_nanos

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # -- the run tree -------------------------------------------------------------------
    def _open(self, run_id: UUID, parent_run_id: UUID | None) -> UUID:
        root = run_id if parent_run_id is None else self._roots.get(parent_run_id, parent_run_id)
        self._roots[run_id] = root
        return root

    def _close(self, run_id: UUID) -> None:
        self._roots.pop(run_id, None)

    # -- start --------------------------------------------------------------------------
    def _begin(self, run_id: UUID, parent_run_id: UUID | None, tags: list[str] | None,
               metadata: dict[str, Any] | None, kwargs: dict[str, Any],
               serialized: dict[str, Any] | None, operation_type: str,
               prompt: Sequence[BaseMessage] | str) -> _Run | None:
        """Note a starting model run: only what cannot wait (the run tree, the context the
        cache reads, the asyncio task). ``None``: someone else records this run."""
        # The model and its output limit are read now, so the run holds no reference to
        # LangChain's invocation parameters and serialized model until it is finished:
        # kept alive that long, they would outlive the garbage collector's young
        # generation and make every collection of the app slower.
        params = kwargs.get("invocation_params") or {}
        model = metadata.get("ls_model_name") if metadata else None
        if not model:
            model = first_value(params, _MODEL_KEYS)
            if not model and serialized:
                model = first_value(serialized.get("kwargs") or {}, _MODEL_KEYS)
        max_tokens = None
        for key in _MAX_TOKEN_KEYS:
            value = params.get(key)
            if isinstance(value, int):
                max_tokens = value
                break
        else:
            value = metadata.get("ls_max_tokens") if metadata else None
            if isinstance(value, int):
                max_tokens = value
        if max_tokens is not None and max_tokens <= 0:
            max_tokens = None  # no limit given: the model's own applies
        tools = params.get("tools")
        run = _Run(operation_type, parent_run_id, self._open(run_id, parent_run_id), tags,
                   metadata, str(model) if model else None, max_tokens,
                   tools if isinstance(tools, list) and tools else None, prompt,
                   time.perf_counter())
        run.openai_compatible = params.get("_type") in _OPENAI_TYPES
        if _attribution_wanted:
            _current_call.set(_Call(run_id, run, self))
        if (metadata and (metadata.get(_ROUTED_MARK) or metadata.get(_METERED_MARK))) \
                or is_metered_call():
            return None
        self._runs[run_id] = run
        self._watch_task(run_id, run)
        return run

    @property
    def _admits_at_start(self) -> bool:
        """Whether a run must be admitted before the call: only a budget can stop a call
        (and ``strict_models`` must raise on the caller's thread)."""
        return self.strict_models or self.engine.has_budgets

    def _resolve(self, run_id: UUID, run: _Run) -> dict[str, Any]:
        """The run's model and admit keyword arguments, worked out once from what LangChain
        gave at its start."""
        if run.kwargs is not None:
            return run.kwargs
        metadata = run.metadata or {}
        max_tokens = run.max_tokens
        base = self._base_kwargs.get(run.operation_type)
        if base is None:
            base = {"operation_type": self.defaults["operation_type"] or run.operation_type,
                    **dict(self._default_attribution)}
        kwargs: dict[str, Any] = base.copy()  # the run's metadata overrides the defaults
        extra: dict[str, Any] | None = None
        for key, value in metadata.items():
            if key in _ATTRIBUTION_KEYS:
                if value is not None:
                    kwargs[key] = value if isinstance(value, str) else str(value)
            elif key in _ROUTE_KEYS:
                if value is not None:
                    kwargs[key] = str(value) if key == "route_reason" else _attempt(value)
            elif not key.startswith(("ls_", "lc_")):  # LangChain's own keys
                if extra is None:
                    extra = {}
                extra[key] = json_safe(value)
        kwargs["run_id"] = str(run_id)
        kwargs["parent_run_id"] = (str(run.parent_run_id) if run.parent_run_id is not None
                                   else None)
        kwargs["root_run_id"] = str(run.root_run_id)
        tags = run.tags
        kwargs["tags"] = (self.tags + tuple(tag for tag in tags if tag not in self.tags)
                          if tags else self.tags)
        kwargs["metadata"] = {**self.metadata, **extra} if extra else dict(self.metadata)
        if max_tokens is not None:
            kwargs["max_output_tokens"] = max_tokens
        if isinstance(run.prompt, str):
            run.prompt_text = run.prompt
        else:
            run.messages = to_openai_messages(run.prompt)
        run.kwargs = kwargs
        return kwargs

    def _prompt_kwargs(self, run: _Run) -> dict[str, Any]:
        if run.messages is not None:
            if run.tools is not None:  # tool definitions are billed as prompt tokens
                return {"messages": run.messages, "tools": run.tools}
            return {"messages": run.messages}
        return {"prompt": run.prompt_text or ""}

    def _unpriced(self, run: _Run, kwargs: dict[str, Any]) -> None:
        """The start model cannot be priced: try again with the response's model name."""
        deferred = dict(kwargs)
        deferred.pop("max_output_tokens", None)
        run.deferred = deferred

    def _no_model(self, run: _Run, kwargs: dict[str, Any]) -> None:
        self._warn_once("no-model", "budgetkit: a model run names no model (no "
                        "ls_model_name or invocation_params['model']); it is recorded "
                        "only if its response names one")
        self._unpriced(run, kwargs)

    def _lane_key(self, run: _Run) -> tuple[Any, ...]:
        """What decides the budget windows of a run's call, as LangChain gave it: runs
        with the same key share an admission lane."""
        metadata = run.metadata
        return (run.model, run.operation_type, tuple(run.tags) if run.tags else (),
                tuple([item for item in metadata.items() if item[0] in _ATTRIBUTION_KEYS])
                if metadata else ())

    def _admit_in_lane(self, run: _Run, key: tuple[Any, ...]) -> bool:
        """Admit a run in its lane (no ticket built, no database); False: not possible,
        admit it the ordinary way."""
        # Runs before every call of a handler with budgets: kept to the few steps needed.
        lane = self._lanes.get(key)
        if lane is None:
            return False
        prompt = run.prompt
        if isinstance(prompt, str):
            bound = text_tokens_bound(prompt)
        else:
            maybe = prompt_tokens_bound(prompt)
            if maybe is None:
                return False
            bound = maybe
            if run.tools is not None and run.model is not None:
                bound += self.engine.count_tool_tokens(run.tools, run.model)  # cached
        held = run.held = lane.admit(bound, run.max_tokens)
        return held is not None

    def _admission(self, run_id: UUID, run: _Run) -> dict[str, Any] | None:
        """The keyword arguments of ``engine.admit`` for a run admitted at its start (the
        model aside), or None when it cannot be admitted (see :meth:`_no_model`)."""
        try:
            kwargs = self._resolve(run_id, run)
        except Exception:
            _log_failure("admit")
            return None
        if run.model is None:
            self._no_model(run, kwargs)
            return None
        return {**self._prompt_kwargs(run), **kwargs}

    def _admitted(self, run: _Run, ticket: Ticket) -> None:
        ticket.started = run.started
        run.ticket = ticket

    def _admit_failed(self, run_id: UUID, run: _Run, error: Exception) -> None:
        """admit raised: a budget stop or a strict unknown model propagates, the rest is
        logged (the call goes on untracked, or recorded if its response names a model)."""
        if isinstance(error, _STOPS) or (self.strict_models
                                        and isinstance(error, UnknownModelError)):
            self._take(run_id)
            raise error
        if isinstance(error, UnknownModelError):
            assert run.kwargs is not None  # resolved by _admission
            self._unpriced(run, run.kwargs)
        else:
            _log_failure("admit")

    # -- cancellation -----------------------------------------------------------------------
    def _watch_task(self, run_id: UUID, run: _Run) -> None:
        """On the async path, notice a cancelled call: ``ainvoke`` fires no event for it."""
        loop = asyncio._get_running_loop()  # None on the sync path (no exception raised)
        if loop is None:
            return
        task = asyncio.current_task(loop)
        if task is not None:
            run.task = task
            run.on_done = functools.partial(self._task_done, run_id)
            task.add_done_callback(run.on_done)

    def _task_done(self, run_id: UUID, task: asyncio.Task[Any]) -> None:
        if run_id not in self._runs:
            return  # the run ended normally
        try:
            error = (asyncio.CancelledError() if task.cancelled()
                     else task.exception() or RuntimeError("the model run ended unfinished"))
            self._end(run_id, None, error)
        except Exception:
            _log_failure("cancellation")

    def _take(self, run_id: UUID) -> _Run | None:
        """Remove and return a run's state at its end (and stop watching its task)."""
        self._close(run_id)
        run = self._runs.pop(run_id, None)
        if run is not None and run.task is not None:
            run.task.remove_done_callback(run.on_done)
        return run

    # -- streaming ------------------------------------------------------------------------
    def _on_token(self, token: Any, run_id: UUID,
                  chunk: Any = None) -> tuple[Ticket, int] | None:
        run = self._runs.get(run_id)
        if run is None:
            return None
        text = token if isinstance(token, str) else message_text(token)
        if chunk is not None:  # per token: only keep what the end needs (see _stream_usage)
            usage = getattr(getattr(chunk, "message", None), "usage_metadata", None)
            if usage:
                if run.chunk_usage is None:
                    run.chunk_usage = []
                run.chunk_usage.append((usage, bool(text)))
        if not text:
            return None
        if run.chunks is None:
            run.chunks = [text]
        else:
            run.chunks.append(text)
        if run.ticket is None and run.held is not None:
            self._make_ticket(run_id, run)  # a stream is long: build the ticket now
        if run.ticket is None or not run.ticket.reservations:
            return None
        run.stream_tokens += self.engine.count_tokens(text, run.ticket.model)
        return run.ticket, run.stream_tokens

    # -- end ------------------------------------------------------------------------------
    def _end(self, run_id: UUID, response: LLMResult | None,
             error: BaseException | None) -> None:
        """A run ended: what is left is bookkeeping, handed to the engine's deferred work."""
        _leave_call(run_id)
        run = self._take(run_id)
        if run is None:
            return
        facts = None if response is None else _Facts.of(response)
        self.engine.defer(functools.partial(self._complete, run_id, run, facts, error,
                                            self.engine.mark_end()))

    def _complete(self, run_id: UUID, run: _Run, facts: _Facts | None,
                  error: BaseException | None, ended: tuple[float, Any]) -> None:
        """Settle, release or record a finished run (usually on the writer's thread)."""
        try:
            if run.ticket is None and run.deferred is None:
                self._make_ticket(run_id, run)
            if run.ticket is not None:
                run.ticket.ended = ended
            outcome = (self._plan_end(facts, run) if facts is not None
                       else self._plan_error(error or RuntimeError("run failed"), run))
            if outcome is not None:
                self._execute(outcome, ended, run.started)
        except Exception:
            _log_failure("on_llm_end" if error is None else "on_llm_error")

    def _make_ticket(self, run_id: UUID, run: _Run) -> None:
        """The ticket of a run not admitted the ordinary way: admitted in a lane (the
        ticket takes over what the lane reserved) or not checked at all (no budgets)."""
        kwargs = self._resolve(run_id, run)
        if run.model is None:
            self._no_model(run, kwargs)
            return
        held, run.held = run.held, None
        try:  # the call has happened: no budget check, but it still counts
            ticket = self.engine.ticket(run.model, **self._prompt_kwargs(run), **kwargs)
        except BaseException as exc:
            if held is not None:
                held.give_back()
            if not isinstance(exc, UnknownModelError):
                raise
            self._unpriced(run, kwargs)
            return
        ticket.started = run.started
        run.ticket = ticket if held is None else held.attach(ticket)

    def _plan_end(self, facts: _Facts, run: _Run) -> _Outcome | None:
        response_metadata = facts.response_metadata
        generation_info = facts.generation_info
        llm_output = facts.llm_output
        if response_metadata.get(_CACHE_MARK) or generation_info.get(_CACHE_MARK):
            return _Outcome("discard", run.ticket)  # budgetkit's cache records the hit
        if response_metadata.get(_ROUTED_MARK):
            return _Outcome("discard", run.ticket)  # a wrapper: its inner runs are recorded
        model = (response_metadata.get("model_name") or response_metadata.get("model")
                 or llm_output.get("model_name") or llm_output.get("model") or run.model)
        raw_usage = facts.usage_metadata
        if run.chunk_usage is not None:  # LangChain summed the chunks: right unless totals
            raw_usage = usage_of_running_totals(run.chunk_usage) or raw_usage
        usage = usage_from_metadata(raw_usage)
        if usage is None:
            usage = usage_from_openai(llm_output.get("token_usage") or llm_output.get("usage")
                                      or generation_info.get("usage"))
        if usage is None and not facts.chat and llm_output.get("token_usage") == {}:
            # A legacy LLM answered several prompts in one request: LangChain gives the
            # request's whole usage to the first prompt's run and an emptied dict to the
            # others (LLMResult.flatten). Counting these again would double the total.
            usage = Usage(0, 0)
        source = "provider"
        if raw_usage and raw_usage.get("total_cost") == 0 and usage is not None:
            return self._foreign_cache_hit(run, model, usage)
        reason = None
        if usage is None:
            usage = self._estimate(run, model, facts.response)
            source = "estimated"
            reason = _estimate_reason(run)
        if run.ticket is None:
            if run.deferred is None or not model:
                return None
            deferred = run.deferred
            if reason is not None:
                deferred = dict(deferred, metadata={**(deferred.get("metadata") or {}),
                                                    ESTIMATE_REASON_KEY: reason})
            return _Outcome("record", None, model,
                            dict(deferred, usage_source=source, **usage.settle_kwargs()))
        return _Outcome("settle", run.ticket, model, {
            "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "reasoning_tokens": usage.reasoning_tokens, "model": model,
            "usage_source": source,
            "metadata": {ESTIMATE_REASON_KEY: reason} if reason is not None else None})

    def _foreign_cache_hit(self, run: _Run, model: str | None, usage: Usage) -> _Outcome | None:
        attribution = run.deferred
        if run.ticket is not None:
            ticket = run.ticket
            attribution = {key: getattr(ticket, key) for key in (
                "operation_type", "user_id", "session_id", "project", "request_id", "run_id",
                "parent_run_id", "root_run_id", "task_type", "tags", "metadata")}
        if attribution is None or not model:
            return None
        return _Outcome("record", run.ticket, model, dict(
            attribution, status="cached", **usage.settle_kwargs()))

    def _estimate(self, run: _Run, model: str | None, response: LLMResult | None) -> Usage:
        """No usage reported: count the prompt and the output with the tokenizer."""
        counting_model = model or run.model or "gpt-4o"
        if run.ticket is not None:
            input_tokens = run.ticket.input_tokens
            counting_model = run.ticket.model
        elif run.messages is not None:
            input_tokens = self.engine.count_message_tokens(run.messages, counting_model,
                                                            tools=run.tools)
        else:
            input_tokens = self.engine.count_tokens(run.prompt_text or "", counting_model)
        text = "".join(run.chunks or ())
        extra = ""
        if not text and response is not None:
            for generations in response.generations[:1]:
                for generation in generations:
                    text += generation.text
                    extra += tool_call_text(generation)
        output_tokens = self.engine.count_tokens(text + extra, counting_model) if (
            text or extra) else 0
        return Usage(input_tokens, output_tokens)

    def _plan_error(self, error: BaseException, run: _Run) -> _Outcome | None:
        if run.ticket is None:
            return None
        partial = "".join(run.chunks or ())
        if not partial:
            return _Outcome("release", run.ticket, kwargs={"error": error})
        # Output was streamed before the failure: the provider bills it, and the prompt.
        output_tokens = self.engine.count_tokens(partial, run.ticket.model)
        return _Outcome("release", run.ticket, kwargs={
            "error": error, "input_tokens": run.ticket.input_tokens,
            "output_tokens": output_tokens, "usage_source": "estimated"})

    def _execute(self, outcome: _Outcome, ended: tuple[float, Any], run_started: float) -> None:
        engine = self.engine
        try:
            if outcome.action == "settle":
                assert outcome.ticket is not None
                self._count(engine.settle(outcome.ticket, **outcome.kwargs))
            elif outcome.action == "release":
                assert outcome.ticket is not None
                self._count(engine.release(outcome.ticket, **outcome.kwargs))
            elif outcome.action == "discard":
                if outcome.ticket is not None:
                    engine.discard(outcome.ticket)
            else:  # record
                if outcome.ticket is not None:
                    engine.discard(outcome.ticket)
                self._record(outcome, ended, run_started)
        except UnknownModelError as exc:
            self._warn_once(f"unknown:{exc.model}", "budgetkit: not recording calls to %r: %s",
                            exc.model, exc)

    def _record(self, outcome: _Outcome, ended: tuple[float, Any], run_started: float) -> None:
        assert outcome.model is not None
        kwargs = dict(outcome.kwargs)
        if kwargs.get("status") == "cached":
            price = self.engine.catalog.get(outcome.model)
            kwargs["saved_nanos"] = price.cost_nanos(
                kwargs["input_tokens"], kwargs["output_tokens"],
                cached_input_tokens=kwargs["cached_input_tokens"],
                cache_write_tokens=kwargs["cache_write_tokens"])
            kwargs["usage_source"] = "provider"
        self._count(self.engine.record(outcome.model, created_at=self.engine.end_time(ended),
                                       latency_ms=(ended[0] - run_started) * 1000.0,
                                       **kwargs))


def _log_failure(where: str) -> None:
    # A bug in tracking must not break the user's LLM call: report it and carry on.
    logger.exception("budgetkit: tracking failed in %s; the call continues untracked", where)


# ---------------------------------------------------------------------------- handlers

class BudgetkitCallbackHandler(_Tracker, BaseCallbackHandler):
    """Records every chat-model / LLM call of a LangChain app in a budgetkit ledger.

    Pass it in ``config={"callbacks": [handler]}`` (it then sees the whole run tree and
    gives every row the chain's root run id), or to a model's ``callbacks=``. Handler-level
    ``user_id`` / ``session_id`` / ``project`` / ``operation_type`` / ``task_type`` /
    ``tags`` / ``metadata`` are defaults; the run's ``metadata`` and ``tags`` override and
    extend them. Works on both the sync and the async path (it runs inline in the caller's
    task there, so keep budgets' database fast) and is thread-safe (``batch`` runs calls on
    several threads). A cancelled ``ainvoke`` is recorded as an ``error`` row
    (``CancelledError``) when its task ends.

    Running totals of the calls it recorded: ``calls``, ``input_tokens``,
    ``output_tokens``, ``cached_input_tokens``, ``reasoning_tokens``, ``total_tokens``,
    ``cost`` (USD), ``cost_nanos`` and ``usage_by_model``. A call's row is written, and
    counted in these, a few milliseconds after it ends (see the module docs); reading a
    total first finishes every call that has ended.
    """

    raise_error = True  # budget stops must reach the caller; everything else is caught
    # Run in the caller's task on the async path too: no thread-pool hop per event, and a
    # cancelled ``ainvoke`` (which fires no LangChain event) is seen through its task.
    run_inline = True

    def __init__(self, engine: Engine, *, user_id: str | None = None,
                 session_id: str | None = None, project: str | None = None,
                 operation_type: str | None = None, task_type: str | None = None,
                 tags: Sequence[str] = (), metadata: Mapping[str, Any] | None = None,
                 strict_models: bool = False) -> None:
        _Tracker.__init__(self, engine, user_id=user_id, session_id=session_id,
                          project=project, operation_type=operation_type,
                          task_type=task_type, tags=tags, metadata=metadata,
                          strict_models=strict_models)

    def __repr__(self) -> str:
        return (f"BudgetkitCallbackHandler(calls={self.calls}, tokens={self.total_tokens}, "
                f"cost=${self.cost:.6f})")

    # -- run tree --------------------------------------------------------------------
    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self._open(run_id, parent_run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    on_tool_start = on_retriever_start = on_chain_start  # type: ignore[assignment]
    on_tool_end = on_retriever_end = on_chain_end  # type: ignore[assignment]
    on_tool_error = on_retriever_error = on_chain_error

    # -- model runs ------------------------------------------------------------------
    def on_chat_model_start(self, serialized: dict[str, Any],
                            messages: list[list[BaseMessage]], *, run_id: UUID,
                            parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:  # the prompt as it is now (a later append must not change what is counted)
            run = self._begin(run_id, parent_run_id, tags, metadata, kwargs, serialized,
                              "chat_completion", tuple(messages[0]) if messages else ())
        except Exception:
            _log_failure("on_chat_model_start")
            return
        if run is not None and self._admits_at_start:
            self._admit(run_id, run)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     parent_run_id: UUID | None = None, tags: list[str] | None = None,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            run = self._begin(run_id, parent_run_id, tags, metadata, kwargs, serialized,
                              "text_generation", prompts[0] if prompts else "")
        except Exception:
            _log_failure("on_llm_start")
            return
        if run is not None and self._admits_at_start:
            self._admit(run_id, run)

    def _admit(self, run_id: UUID, run: _Run) -> None:
        key = self._lane_key(run)
        if self._admit_in_lane(run, key):
            return
        kwargs = self._admission(run_id, run)
        if kwargs is None:
            return
        try:
            ticket = self.engine.admit(run.model, **kwargs)  # type: ignore[arg-type]
        except Exception as exc:
            self._admit_failed(run_id, run, exc)
        else:
            self._admitted(run, ticket)
            self._lanes.remember(key, ticket)

    def on_llm_new_token(self, token: Any, *, run_id: UUID, chunk: Any = None,
                         **kwargs: Any) -> None:
        try:
            check = self._on_token(token, run_id, chunk)
        except Exception:
            _log_failure("on_llm_new_token")
            return
        if check is not None:
            self.engine.check_stream(*check)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, response, None)
        except Exception:
            _log_failure("on_llm_end")

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, None, error)
        except Exception:
            _log_failure("on_llm_error")


# ---------------------------------------------------------------------------- context manager

_active_handler: ContextVar[BudgetkitCallbackHandler | None] = ContextVar(
    "budgetkit_callback_handler", default=None)
register_configure_hook(_active_handler, inheritable=True)


@contextmanager
def get_budgetkit_callback(engine: Engine, **defaults: Any) -> Iterator[BudgetkitCallbackHandler]:
    """Record every LangChain model call made inside the ``with`` block.

    Like ``langchain_core.callbacks.get_usage_metadata_callback``: no ``callbacks=`` needed.
    Yields the handler, whose running totals (``total_tokens``, ``cost``,
    ``usage_by_model``, ...) cover the block's calls. ``defaults`` are the handler's
    keyword arguments (``user_id=``, ``project=``, ...).

        with get_budgetkit_callback(engine, user_id="alice") as cb:
            chain.invoke(question)
        print(cb.total_tokens, cb.cost)
    """
    handler = BudgetkitCallbackHandler(engine, **defaults)
    token = _active_handler.set(handler)
    try:
        yield handler
    finally:
        _active_handler.reset(token)


def _attempt(value: Any) -> int | None:
    """An attempt number from run metadata (an int, or a numeric string), else None."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
