"""The framework-event logic the LangChain callback handlers share (:class:`_Tracker`):
the run tree, a model run's start (attribution, admission, admission lanes), its stream,
cancellation, and its end up to the deferred work (whose outcome is ``_settlement``'s).

The attribution of the run that started last in this context lives here, beside the code
that starts runs: a run's start reads the module-level switch
(:func:`want_call_attribution`) as a plain global on the per-call path.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any
from uuid import UUID

from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult

from budgetkit import BudgetExceeded, ContextWindowExceeded, Engine, UnknownModelError
from budgetkit.budgets import Lanes
from budgetkit.ledger import Ticket
from budgetkit.pricing import text_tokens_bound
from budgetkit.routing import is_metered_call

from ._messages import message_text, prompt_tokens_bound, to_openai_messages
from ._runs import _METERED_MARK, _ROUTED_MARK, _Facts, _log_failure, _Run
from ._settlement import _Settlement, _Totals
from ._usage_parse import first_value, json_safe

__all__ = ["current_call_attribution", "want_call_attribution"]

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


class _Tracker(_Settlement):
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


def _attempt(value: Any) -> int | None:
    """An attempt number from run metadata (an int, or a numeric string), else None."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
