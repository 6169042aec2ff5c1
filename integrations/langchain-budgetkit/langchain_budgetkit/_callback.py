"""LangChain callback handlers that record every chat-model and LLM call in a budgetkit ledger.

    engine = budgetkit.Engine()
    handler = BudgetkitCallbackHandler(engine, user_id="alice", project="support-bot")
    chain.invoke(question, config={"callbacks": [handler]})

The life of one model run, by LangChain event:

- ``on_chat_model_start`` / ``on_llm_start``: the prompt is converted to OpenAI-format
  messages and the engine *admits* the call (counts the prompt, prices the worst case,
  checks budgets). A :class:`budgetkit.BudgetExceeded` propagates (the handler has
  ``raise_error = True``), so the provider is never called; the engine has already written
  the ``blocked`` row.
- ``on_llm_new_token``: streamed text is kept (for the estimate below) and, when the engine
  offers ``check_stream``, the budget is checked as tokens arrive; its
  ``BudgetExceeded`` cuts the stream.
- ``on_llm_end``: the provider's ``usage_metadata`` (cache reads, cache writes and reasoning
  tokens included) settles the ticket, priced as the model the response names. Without
  usage (some streams, fakes) the tokenizer counts the prompt and the output and the row
  says ``usage_source="estimated"``.
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
``budgetkit._cascade.is_metered_call()`` is true).

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
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tracers.context import register_configure_hook

from budgetkit import BudgetExceeded, ContextWindowExceeded, Engine, UnknownModelError
from budgetkit._cascade import is_metered_call
from budgetkit._engine import Ticket, UsageRecord
from budgetkit._usage import Usage

from ._messages import message_text, to_openai_messages

__all__ = ["BudgetkitCallbackHandler", "AsyncBudgetkitCallbackHandler",
           "get_budgetkit_callback", "usage_from_metadata"]

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
    """A started model run's attribution. Ending the run marks the object rather than
    resetting the variable: LangChain ends async runs inside child tasks (copied contexts),
    where a reset would not reach the caller's context, but the shared object's mark does."""

    __slots__ = ("run_id", "attribution", "ended")

    def __init__(self, run_id: UUID, attribution: dict[str, Any]) -> None:
        self.run_id, self.attribution, self.ended = run_id, attribution, False


_current_call: ContextVar[_Call | None] = ContextVar("budgetkit_current_call", default=None)


def current_call_attribution() -> dict[str, Any]:
    """Attribution of the model run being started in this context ({} outside one)."""
    current = _current_call.get()
    if current is None or current.ended:
        return {}
    kwargs = current.attribution  # filtered here, off the per-call path
    return {key: kwargs[key] for key in _CALL_KEYS if key in kwargs}


def _enter_call(run_id: UUID, kwargs: dict[str, Any]) -> None:
    _current_call.set(_Call(run_id, kwargs))  # the run's admit kwargs, never mutated


def _leave_call(run_id: UUID) -> None:
    current = _current_call.get()
    if current is not None and current.run_id == run_id:
        current.ended = True


_ATTRIBUTION_KEYS = frozenset(("user_id", "session_id", "project", "operation_type",
                               "task_type", "request_id"))
_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens",
                   "max_new_tokens", "num_predict", "maxOutputTokens")
_MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name", "azure_deployment")
_CACHE_MARK = "budgetkit_cache_hit"
#: A run of budgetkit's routed model (its cost is recorded on its inner runs) and an inner
#: run that model has already recorded itself (see langchain_budgetkit._routed).
_ROUTED_MARK = "budgetkit_routed"
_METERED_MARK = "budgetkit_metered"


# ---------------------------------------------------------------------------- usage parsing

def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _is(key: str, name: str) -> bool:
    """``key`` is ``name`` or a service tier's spelling of it (``priority_cache_read``)."""
    return key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "_")


def usage_from_metadata(usage: Mapping[str, Any] | None) -> Usage | None:
    """Read LangChain's ``usage_metadata`` (``None`` when it reports nothing).

    ``cache_read`` → cached input, ``cache_creation`` → cache writes (Anthropic's
    ``ephemeral_5m_input_tokens`` / ``ephemeral_1h_input_tokens`` instead when present, so
    writes are counted once), ``reasoning`` → reasoning tokens. OpenAI's priority and flex
    tiers prefix these keys with the tier name; both spellings are read.
    """
    if not usage:
        return None
    input_tokens = _int(usage.get("input_tokens"))
    output_tokens = _int(usage.get("output_tokens"))
    if not input_tokens and not output_tokens:
        return None  # fakes and some streams report zeros: nothing was measured
    cached = created = ephemeral = reasoning = 0
    for key, value in (usage.get("input_token_details") or {}).items():
        if value and isinstance(value, int):
            if _is(key, "cache_read"):
                cached += value
            elif _is(key, "cache_creation"):
                created += value
            elif key.startswith("ephemeral_") and key.endswith("_input_tokens"):
                ephemeral += value
    for key, value in (usage.get("output_token_details") or {}).items():
        if value and isinstance(value, int) and _is(key, "reasoning"):
            reasoning += value
    # The details are parts of the totals; never let a provider quirk exceed them.
    cached = min(cached, input_tokens)
    cache_write = min(ephemeral or created, input_tokens - cached)
    return Usage(input_tokens, output_tokens, cached, cache_write, min(reasoning, output_tokens))


def _usage_from_openai(token_usage: Mapping[str, Any] | None) -> Usage | None:
    """Read an OpenAI-style ``token_usage`` dict (legacy LLMs' ``llm_output``)."""
    if not token_usage:
        return None
    prompt = _int(token_usage.get("prompt_tokens") or token_usage.get("input_tokens"))
    completion = _int(token_usage.get("completion_tokens") or token_usage.get("output_tokens"))
    if not prompt and not completion:
        return None
    prompt_details = token_usage.get("prompt_tokens_details") or {}
    completion_details = token_usage.get("completion_tokens_details") or {}
    cached = min(_int(prompt_details.get("cached_tokens")), prompt)
    return Usage(prompt, completion, cached, 0,
                 min(_int(completion_details.get("reasoning_tokens")), completion))


# ---------------------------------------------------------------------------- run state

@dataclass(slots=True)
class _Run:
    """What the handler keeps between a model run's start and its end."""

    ticket: Ticket | None
    model: str | None
    #: set when the catalog could not price the start model: recorded at the end if the
    #: response names a model it can price
    deferred: dict[str, Any] | None = None
    prompt_text: str | None = None
    messages: list[dict[str, Any]] | None = None
    chunks: list[str] = field(default_factory=list)
    stream_tokens: int = 0
    skip: bool = False  # recorded by someone else (see the module docs)
    task: Any = None  # the asyncio task running the call (async path), watched for cancel
    on_done: Any = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What to tell the engine at a run's end (executed sync or async by the handler)."""

    action: str  # "settle" | "discard" | "record" | "release"
    ticket: Ticket | None = None
    model: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def _first(mapping: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The first truthy value of ``keys`` in ``mapping`` (``None`` when there is none)."""
    for key in keys:
        value = mapping.get(key)
        if value:
            return value
    return None


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Metadata goes to a JSON column: keep JSON values, stringify the rest."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if depth < 4 and isinstance(value, Mapping):
        return {str(key): _json_safe(item, depth + 1) for key, item in value.items()}
    if depth < 4 and isinstance(value, (list, tuple)):
        return [_json_safe(item, depth + 1) for item in value]
    return str(value)


class _Tracker:
    """The framework-event logic both handlers share; the engine calls are left to them."""

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
        self._roots: dict[UUID, UUID] = {}  # run id -> root run id, for runs still open
        self._warned: set[str] = set()
        self._totals_lock = threading.Lock()
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_input_tokens = 0
        self.reasoning_tokens = 0
        self.cost_nanos = 0
        self.usage_by_model: dict[str, dict[str, int]] = {}

    # -- running totals -------------------------------------------------------------------
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
            self.calls += 1
            self.input_tokens += record.input_tokens
            self.output_tokens += record.output_tokens
            self.cached_input_tokens += record.cached_input_tokens
            self.reasoning_tokens += record.reasoning_tokens
            self.cost_nanos += record.cost_nanos
            per_model = self.usage_by_model.get(record.model)
            if per_model is None:
                per_model = self.usage_by_model[record.model] = {
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
    def _plan_start(self, run_id: UUID, parent_run_id: UUID | None, tags: list[str] | None,
                    metadata: dict[str, Any] | None, invocation_params: dict[str, Any] | None,
                    serialized: dict[str, Any] | None, *, operation_type: str,
                    messages: list[dict[str, Any]] | None = None,
                    prompt: str | None = None) -> tuple[_Run, dict[str, Any]]:
        # Runs on every model call: plain loops and dict lookups, no generators or copies.
        metadata = metadata or {}
        params = invocation_params or {}
        model = metadata.get("ls_model_name")
        if not model:
            model = _first(params, _MODEL_KEYS)
            if not model and serialized:
                model = _first(serialized.get("kwargs") or {}, _MODEL_KEYS)
        max_tokens = None
        for key in _MAX_TOKEN_KEYS:
            value = params.get(key)
            if isinstance(value, int):
                max_tokens = value
                break
        else:
            value = metadata.get("ls_max_tokens")
            if isinstance(value, int):
                max_tokens = value
        base = self._base_kwargs.get(operation_type)
        if base is None:
            base = {"operation_type": self.defaults["operation_type"] or operation_type,
                    **dict(self._default_attribution)}
        kwargs: dict[str, Any] = base.copy()  # the run's metadata overrides the defaults
        extra: dict[str, Any] | None = None
        for key, value in metadata.items():
            if key in _ATTRIBUTION_KEYS:
                if value is not None:
                    kwargs[key] = value if isinstance(value, str) else str(value)
            elif not key.startswith(("ls_", "lc_")):  # LangChain's own keys
                if extra is None:
                    extra = {}
                extra[key] = _json_safe(value)
        run_text = str(run_id)
        if parent_run_id is None:  # a top-level run is its own root
            self._roots[run_id] = run_id
            kwargs["run_id"] = kwargs["root_run_id"] = run_text
            kwargs["parent_run_id"] = None
        else:
            root = self._open(run_id, parent_run_id)
            kwargs["run_id"] = run_text
            kwargs["parent_run_id"] = str(parent_run_id)
            kwargs["root_run_id"] = str(root)
        kwargs["tags"] = (self.tags + tuple(tag for tag in tags if tag not in self.tags)
                          if tags else self.tags)
        kwargs["metadata"] = {**self.metadata, **extra} if extra else dict(self.metadata)
        run = _Run(ticket=None, model=str(model) if model else None, messages=messages,
                   prompt_text=prompt,
                   skip=bool(metadata.get(_ROUTED_MARK) or metadata.get(_METERED_MARK)
                             or is_metered_call()))
        if max_tokens is not None and max_tokens > 0:
            kwargs["max_output_tokens"] = max_tokens
        return run, kwargs

    def _admit_kwargs(self, run: _Run, kwargs: dict[str, Any]) -> dict[str, Any]:
        if run.messages is not None:
            return dict(kwargs, messages=run.messages)
        return dict(kwargs, prompt=run.prompt_text or "")

    def _unpriced(self, run_id: UUID, run: _Run, kwargs: dict[str, Any],
                  error: Exception | None) -> None:
        """The start model cannot be priced: try again with the response's model name."""
        if self.strict_models and error is not None:
            raise error
        kwargs.pop("max_output_tokens", None)
        run.deferred = kwargs
        self._runs[run_id] = run
        self._watch_task(run_id, run)

    def _started(self, run_id: UUID, run: _Run, ticket: Ticket) -> None:
        run.ticket = ticket
        self._runs[run_id] = run
        self._watch_task(run_id, run)

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
            outcome = self._plan_error(error, run_id)
            if outcome is not None:
                self._execute(outcome)
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
    def _on_token(self, token: Any, run_id: UUID) -> tuple[Ticket, int] | None:
        run = self._runs.get(run_id)
        if run is None:
            return None
        text = token if isinstance(token, str) else message_text(token)
        if not text:
            return None
        run.chunks.append(text)
        check = getattr(self.engine, "check_stream", None)
        if check is None or run.ticket is None:
            return None
        run.stream_tokens += self.engine.count_tokens(text, run.ticket.model)
        return run.ticket, run.stream_tokens

    # -- end ------------------------------------------------------------------------------
    def _plan_end(self, response: LLMResult, run_id: UUID) -> _Outcome | None:
        _leave_call(run_id)
        run = self._take(run_id)
        if run is None:
            return None
        generations = response.generations
        generation = (generations[0][0] if generations and generations[0]
                      else next((gen for gens in generations for gen in gens), None))
        message = generation.message if isinstance(generation, ChatGeneration) else None
        response_metadata = getattr(message, "response_metadata", None) or {}
        generation_info = (generation.generation_info if generation is not None else None) or {}
        llm_output = response.llm_output or {}
        if response_metadata.get(_CACHE_MARK) or generation_info.get(_CACHE_MARK):
            return _Outcome("discard", run.ticket)  # budgetkit's cache records the hit
        if response_metadata.get(_ROUTED_MARK):
            return _Outcome("discard", run.ticket)  # a wrapper: its inner runs are recorded
        model = (response_metadata.get("model_name") or response_metadata.get("model")
                 or llm_output.get("model_name") or llm_output.get("model") or run.model)
        raw_usage = getattr(message, "usage_metadata", None)
        usage = usage_from_metadata(raw_usage)
        if usage is None:
            usage = _usage_from_openai(llm_output.get("token_usage") or llm_output.get("usage")
                                       or generation_info.get("usage"))
        if usage is None and message is None and llm_output.get("token_usage") == {}:
            # A legacy LLM answered several prompts in one request: LangChain gives the
            # request's whole usage to the first prompt's run and an emptied dict to the
            # others (LLMResult.flatten). Counting these again would double the total.
            usage = Usage(0, 0)
        source = "provider"
        if raw_usage and raw_usage.get("total_cost") == 0 and usage is not None:
            return self._foreign_cache_hit(run, model, usage)
        if usage is None:
            usage = self._estimate(run, model, response)
            source = "estimated"
        if run.ticket is None:
            if run.deferred is None or not model:
                return None
            return _Outcome("record", None, model,
                            dict(run.deferred, usage_source=source, **usage.settle_kwargs()))
        return _Outcome("settle", run.ticket, model, {
            "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "reasoning_tokens": usage.reasoning_tokens, "model": model,
            "usage_source": source})

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

    def _estimate(self, run: _Run, model: str | None, response: LLMResult) -> Usage:
        """No usage reported: count the prompt and the output with the tokenizer."""
        counting_model = model or run.model or "gpt-4o"
        if run.ticket is not None:
            input_tokens = run.ticket.input_tokens
            counting_model = run.ticket.model
        elif run.messages is not None:
            input_tokens = self.engine.count_message_tokens(run.messages, counting_model)
        else:
            input_tokens = self.engine.count_tokens(run.prompt_text or "", counting_model)
        text = "".join(run.chunks)
        extra = ""
        if not text:
            for generations in response.generations[:1]:
                for generation in generations:
                    text += generation.text
                    extra += _tool_call_text(generation)
        output_tokens = self.engine.count_tokens(text + extra, counting_model) if (
            text or extra) else 0
        return Usage(input_tokens, output_tokens)

    def _plan_error(self, error: BaseException, run_id: UUID) -> _Outcome | None:
        _leave_call(run_id)
        run = self._take(run_id)
        if run is None or run.ticket is None:
            return None
        partial = "".join(run.chunks)
        if not partial:
            return _Outcome("release", run.ticket, kwargs={"error": error})
        # Output was streamed before the failure: the provider bills it, and the prompt.
        output_tokens = self.engine.count_tokens(partial, run.ticket.model)
        return _Outcome("release", run.ticket, kwargs={
            "error": error, "input_tokens": run.ticket.input_tokens,
            "output_tokens": output_tokens, "usage_source": "estimated"})

    def _execute(self, outcome: _Outcome) -> None:
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
                self._record(outcome)
        except UnknownModelError as exc:
            self._warn_once(f"unknown:{exc.model}", "budgetkit: not recording calls to %r: %s",
                            exc.model, exc)

    def _record(self, outcome: _Outcome) -> None:
        assert outcome.model is not None
        kwargs = dict(outcome.kwargs)
        if kwargs.get("status") == "cached":
            price = self.engine.catalog.get(outcome.model)
            kwargs["saved_nanos"] = price.cost_nanos(
                kwargs["input_tokens"], kwargs["output_tokens"],
                cached_input_tokens=kwargs["cached_input_tokens"],
                cache_write_tokens=kwargs["cache_write_tokens"])
            kwargs["usage_source"] = "provider"
        self._count(self.engine.record(outcome.model, **kwargs))


def _tool_call_text(generation: Any) -> str:
    message = getattr(generation, "message", None)
    calls = getattr(message, "tool_calls", None) or ()
    return "".join(call.get("name", "") + json.dumps(call.get("args", {}), separators=(",", ":"))
                   for call in calls)


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
    ``cost`` (USD), ``cost_nanos`` and ``usage_by_model``.
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
    on_tool_error = on_retriever_error = on_chain_error  # type: ignore[assignment]

    # -- model runs ------------------------------------------------------------------
    def on_chat_model_start(self, serialized: dict[str, Any],
                            messages: list[list[BaseMessage]], *, run_id: UUID,
                            parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            prompt = to_openai_messages(messages[0] if messages else [])
            run, admit = self._plan_start(run_id, parent_run_id, tags, metadata,
                                          kwargs.get("invocation_params"), serialized,
                                          operation_type="chat_completion", messages=prompt)
        except Exception:
            _log_failure("on_chat_model_start")
            return
        self._admit(run_id, run, admit)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     parent_run_id: UUID | None = None, tags: list[str] | None = None,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            run, admit = self._plan_start(run_id, parent_run_id, tags, metadata,
                                          kwargs.get("invocation_params"), serialized,
                                          operation_type="text_generation",
                                          prompt=prompts[0] if prompts else "")
        except Exception:
            _log_failure("on_llm_start")
            return
        self._admit(run_id, run, admit)

    def _admit(self, run_id: UUID, run: _Run, kwargs: dict[str, Any]) -> None:
        _enter_call(run_id, kwargs)
        if run.skip:
            return
        if run.model is None:
            self._warn_once("no-model", "budgetkit: a model run names no model (no "
                            "ls_model_name or invocation_params['model']); it is recorded "
                            "only if its response names one")
            self._unpriced(run_id, run, kwargs, None)
            return
        try:
            if run.messages is not None:  # (no dict copy: this runs on every call)
                ticket = self.engine.admit(run.model, messages=run.messages, **kwargs)
            else:
                ticket = self.engine.admit(run.model, prompt=run.prompt_text or "", **kwargs)
        except _STOPS:
            self._close(run_id)
            raise
        except UnknownModelError as exc:
            self._unpriced(run_id, run, kwargs, exc)
        except Exception:
            _log_failure("admit")
        else:
            self._started(run_id, run, ticket)

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            check = self._on_token(token, run_id)
        except Exception:
            _log_failure("on_llm_new_token")
            return
        if check is not None:
            self.engine.check_stream(*check)  # type: ignore[attr-defined]

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            outcome = self._plan_end(response, run_id)
            if outcome is not None:
                self._execute(outcome)
        except Exception:
            _log_failure("on_llm_end")

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            outcome = self._plan_error(error, run_id)
            if outcome is not None:
                self._execute(outcome)
        except Exception:
            _log_failure("on_llm_error")


class AsyncBudgetkitCallbackHandler(_Tracker, AsyncCallbackHandler):
    """:class:`BudgetkitCallbackHandler` for asyncio-only apps: no thread-pool hop per event.

    Budget checks that touch the database run through the engine's async methods. Note that
    LangChain swallows exceptions of *async* handlers on the *sync* path (``invoke``): there
    it records usage but cannot stop a call. Use the sync handler when budgets must also
    stop sync calls.
    """

    raise_error = True
    run_inline = True  # awaited in the caller's task (see BudgetkitCallbackHandler)

    def __init__(self, engine: Engine, *, user_id: str | None = None,
                 session_id: str | None = None, project: str | None = None,
                 operation_type: str | None = None, task_type: str | None = None,
                 tags: Sequence[str] = (), metadata: Mapping[str, Any] | None = None,
                 strict_models: bool = False) -> None:
        _Tracker.__init__(self, engine, user_id=user_id, session_id=session_id,
                          project=project, operation_type=operation_type,
                          task_type=task_type, tags=tags, metadata=metadata,
                          strict_models=strict_models)

    async def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID,
                             parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self._open(run_id, parent_run_id)

    async def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    async def on_chain_error(self, error: BaseException, *, run_id: UUID,
                             **kwargs: Any) -> None:
        self._close(run_id)

    on_tool_start = on_retriever_start = on_chain_start  # type: ignore[assignment]
    on_tool_end = on_retriever_end = on_chain_end  # type: ignore[assignment]
    on_tool_error = on_retriever_error = on_chain_error  # type: ignore[assignment]

    async def on_chat_model_start(self, serialized: dict[str, Any],
                                  messages: list[list[BaseMessage]], *, run_id: UUID,
                                  parent_run_id: UUID | None = None,
                                  tags: list[str] | None = None,
                                  metadata: dict[str, Any] | None = None,
                                  **kwargs: Any) -> None:
        try:
            prompt = to_openai_messages(messages[0] if messages else [])
            run, admit = self._plan_start(run_id, parent_run_id, tags, metadata,
                                          kwargs.get("invocation_params"), serialized,
                                          operation_type="chat_completion", messages=prompt)
        except Exception:
            _log_failure("on_chat_model_start")
            return
        await self._aadmit(run_id, run, admit)

    async def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *,
                           run_id: UUID, parent_run_id: UUID | None = None,
                           tags: list[str] | None = None,
                           metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            run, admit = self._plan_start(run_id, parent_run_id, tags, metadata,
                                          kwargs.get("invocation_params"), serialized,
                                          operation_type="text_generation",
                                          prompt=prompts[0] if prompts else "")
        except Exception:
            _log_failure("on_llm_start")
            return
        await self._aadmit(run_id, run, admit)

    async def _aadmit(self, run_id: UUID, run: _Run, kwargs: dict[str, Any]) -> None:
        _enter_call(run_id, kwargs)
        if run.skip:
            return
        if run.model is None:
            self._unpriced(run_id, run, kwargs, None)
            return
        try:
            ticket = await self.engine.aadmit(run.model, **self._admit_kwargs(run, kwargs))
        except _STOPS:
            self._close(run_id)
            raise
        except UnknownModelError as exc:
            self._unpriced(run_id, run, kwargs, exc)
        except Exception:
            _log_failure("admit")
        else:
            self._started(run_id, run, ticket)

    async def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            check = self._on_token(token, run_id)
        except Exception:
            _log_failure("on_llm_new_token")
            return
        if check is not None:
            self.engine.check_stream(*check)  # type: ignore[attr-defined]

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            outcome = self._plan_end(response, run_id)
            if outcome is not None:
                await self._aexecute(outcome)
        except Exception:
            _log_failure("on_llm_end")

    async def on_llm_error(self, error: BaseException, *, run_id: UUID,
                           **kwargs: Any) -> None:
        try:
            outcome = self._plan_error(error, run_id)
            if outcome is not None:
                await self._aexecute(outcome)
        except Exception:
            _log_failure("on_llm_error")

    async def _aexecute(self, outcome: _Outcome) -> None:
        if self.engine._budgets is None:  # nothing touches the database on the hot path
            self._execute(outcome)
        else:
            await asyncio.to_thread(self._execute, outcome)


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
