"""Usage tracking *and budget enforcement* on LlamaIndex's legacy ``CallbackManager``.

    llm = OpenAI(model="gpt-4o-mini", callback_manager=CallbackManager(
        [BudgetkitCallbackHandler(engine, user_id="alice")]))

Unlike the instrumentation dispatcher, the ``CallbackManager`` does not guard its handlers:
an exception raised in ``on_event_start`` for an LLM event aborts ``chat`` / ``complete``
(and their async and streaming forms) before the provider is called. So this handler
*admits* each LLM call: a :class:`budgetkit.BudgetExceeded` stops it (the engine writes the
``blocked`` row), every other call is settled with the provider's usage when it ends.
Anything else that goes wrong in tracking is logged and never breaks the call.

Run ids: ``run_id`` is the LLM / embedding event's id, ``parent_run_id`` the event it runs
in and ``root_run_id`` the outermost trace or event open around it (the ``query`` trace of a
query engine, the ``chat`` trace of a chat engine turn), so every row of one query shares a
root.

``Settings.callback_manager`` reaches only LLMs created after it is set (or fetched via
``Settings.llm``); pass ``callback_manager=`` to LLMs created earlier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.span import active_span_id

from budgetkit import BudgetExceeded, ContextWindowExceeded, Engine

from ._events import _model_of, is_query_span
from ._runs import RunIds, end_legacy_trace, legacy_run_ids, start_legacy_trace
from ._tracker import Tracker, TrackerTotals, log_failure, to_openai_messages

__all__ = ["BudgetkitCallbackHandler"]

_STOPS = (BudgetExceeded, ContextWindowExceeded)


class BudgetkitCallbackHandler(BaseCallbackHandler, TrackerTotals):
    """Records (and, with budgets, admits) LlamaIndex LLM and embedding calls.

    Attribution as for :class:`BudgetkitEventHandler`: handler defaults, then the
    innermost :func:`~llama_index.callbacks.budgetkit.attribution` block. Running totals:
    ``calls``, ``input_tokens``, ``output_tokens``, ``total_tokens``, ``cost``.
    """

    def __init__(self, engine: Engine, *, user_id: str | None = None,
                 session_id: str | None = None, project: str | None = None,
                 task_type: str | None = None, tags: Sequence[str] = (),
                 metadata: Mapping[str, Any] | None = None) -> None:
        ignored: list[CBEventType] = [event for event in CBEventType
                   if event not in (CBEventType.LLM, CBEventType.EMBEDDING)]
        super().__init__(event_starts_to_ignore=ignored, event_ends_to_ignore=ignored)
        self._tracker = Tracker(engine, user_id=user_id, session_id=session_id,
                                project=project, task_type=task_type, tags=tags,
                                metadata=metadata)
        self._embeddings: dict[str, tuple[str | None, str, RunIds]] = {}

    def start_trace(self, trace_id: str | None = None) -> None:
        start_legacy_trace(trace_id)

    def end_trace(self, trace_id: str | None = None,
                  trace_map: dict[str, list[str]] | None = None) -> None:
        end_legacy_trace()

    def on_event_start(self, event_type: CBEventType, payload: dict[str, Any] | None = None,
                       event_id: str = "", parent_id: str = "", **kwargs: Any) -> str:
        payload = payload or {}
        try:
            if event_type == CBEventType.EMBEDDING:
                operation = ("query_embedding" if is_query_span(active_span_id.get())
                             else "embedding")
                self._embeddings[event_id] = (
                    _model_of(payload.get(EventPayload.SERIALIZED)), operation,
                    legacy_run_ids(event_id, parent_id))
                return event_id
            if event_type != CBEventType.LLM or not self._tracker.enter(event_id):
                return event_id
            serialized = payload.get(EventPayload.SERIALIZED) or {}
            model = _model_of(serialized)
            max_output = serialized.get("num_output")
            messages = payload.get(EventPayload.MESSAGES)
            tracker = self._tracker
            run = legacy_run_ids(event_id, parent_id)
            prepared: dict[str, Any]
            if messages is not None:
                kwargs_ = tracker.attribution(event_id, "chat_completion", run=run)
                prepared = {"messages": to_openai_messages(messages)}
            else:
                kwargs_ = tracker.attribution(event_id, "text_generation", run=run)
                prepared = {"prompt": str(payload.get(EventPayload.PROMPT) or "")}
        except Exception:
            log_failure("on_event_start")
            return event_id
        try:
            tracker.begin(event_id, model, kwargs_, admit=True,
                          max_output_tokens=max_output if isinstance(max_output, int)
                          and max_output > 0 else None, **prepared)
        except _STOPS:
            raise  # the budget says no: LlamaIndex aborts the call before the provider runs
        except Exception:
            log_failure("admit")
        return event_id

    def on_event_end(self, event_type: CBEventType, payload: dict[str, Any] | None = None,
                     event_id: str = "", **kwargs: Any) -> None:
        payload = payload or {}
        try:
            if event_type == CBEventType.EMBEDDING:
                model, operation, run = self._embeddings.pop(event_id, (None, "embedding", None))
                chunks = payload.get(EventPayload.CHUNKS) or []
                self._tracker.embedding(event_id, model, [str(c) for c in chunks], operation,
                                        run=run)
            elif event_type == CBEventType.LLM:
                self._end_llm(event_id, payload)
        except Exception:
            log_failure("on_event_end")

    def _end_llm(self, event_id: str, payload: Mapping[str, Any]) -> None:
        if EventPayload.EXCEPTION in payload:
            self._tracker.fail(event_id, payload[EventPayload.EXCEPTION])
            return
        response = payload.get(EventPayload.RESPONSE)
        if response is None:
            response = payload.get(EventPayload.COMPLETION)
        if response is None:
            self._tracker.fail(event_id, None)
            return
        message = getattr(response, "message", None)
        text = message.content if message is not None else getattr(response, "text", None)
        self._tracker.finish(event_id, text=text, raw=getattr(response, "raw", None),
                             additional_kwargs=getattr(response, "additional_kwargs", None))
