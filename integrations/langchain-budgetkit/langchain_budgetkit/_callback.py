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
``budgetkit.routing.is_metered_call()`` is true).

Cache hits: LangChain replays a cached generation through ``on_llm_end`` with its
original usage and ``usage_metadata["total_cost"] == 0``. A hit served by budgetkit's own
cache carries ``"budgetkit_cache_hit": True`` in ``response_metadata`` / ``generation_info``;
that cache writes its own ``cached`` row, so the handler only returns the ticket's
reservation (:meth:`Engine.discard`). Hits from any other LangChain cache are recorded by
the handler as ``cached`` rows with zero cost and the money they saved.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.tracers.context import register_configure_hook

from budgetkit import Engine

from ._runs import _log_failure, _Run
from ._tracker import _Tracker
from ._usage_parse import usage_from_metadata

__all__ = ["BudgetkitCallbackHandler", "get_budgetkit_callback", "usage_from_metadata"]


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
