"""Usage tracking on LlamaIndex's instrumentation dispatcher (the current hook).

    from llama_index.core.instrumentation import get_dispatcher
    get_dispatcher().add_event_handler(BudgetkitEventHandler(engine))
    # or: BudgetkitEventHandler(engine).register()

Chat and completion calls (streamed or not) and embedding calls each get one usage row,
priced with the model the response names and the provider's usage (``raw.usage``: cached
input and reasoning tokens included). Without usage the tokenizer counts prompt and output
and the row says ``usage_source="estimated"``.

The dispatcher swallows every exception a handler raises, so this handler *tracks* but
cannot stop a call: for budgets that stop calls use the legacy
:class:`~llama_index.callbacks.budgetkit.BudgetkitCallbackHandler` on a ``CallbackManager``
(do not use both on the same LLM: each records every call). A call that raises before any
output fires no end event; :meth:`register` also adds a span handler that records it as an
``error`` row.

Run ids: each row's ``run_id`` is its LLM / embedding span, ``parent_run_id`` the span that
called it and ``root_run_id`` the outermost span (the ``query`` / ``chat`` / agent ``run``),
so every row of one query shares a root. Parents are known only to span handlers: a handler
added with :meth:`register` knows them; one added with ``add_event_handler`` alone records
``run_id`` only.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.embedding import EmbeddingEndEvent, EmbeddingStartEvent
from llama_index.core.instrumentation.events.exception import ExceptionEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.instrumentation.span.simple import SimpleSpan
from pydantic import PrivateAttr

from budgetkit import Engine

from ._runs import RunIds, SpanTree
from ._tracker import Tracker, TrackerTotals, log_failure, to_openai_messages

__all__ = ["BudgetkitEventHandler"]



def is_query_span(span_id: str | None) -> bool:
    """Span ids are ``<Class>.<method>-<uuid>``: a query embedding's names its method."""
    method = (span_id or "").rsplit("-", 5)[0].rsplit(".", 1)[-1]
    return method in ("get_query_embedding", "aget_query_embedding")


def _model_of(model_dict: Mapping[str, Any] | None) -> str | None:
    model_dict = model_dict or {}
    for key in ("model", "model_name"):
        value = model_dict.get(key)
        if isinstance(value, str) and value and value != "unknown":
            return value
    return None


class BudgetkitEventHandler(BaseEventHandler, TrackerTotals):
    """Records LlamaIndex LLM and embedding calls in a budgetkit ledger (tracking only).

    Attribution: the handler's defaults (``user_id=``, ``project=``, ...), then the
    innermost :func:`~llama_index.callbacks.budgetkit.attribution` block, then
    ``instrument_tags`` keys of the same names. Running totals: ``calls``,
    ``input_tokens``, ``output_tokens``, ``total_tokens``, ``cost``.
    """

    _tracker: Tracker = PrivateAttr()
    _embedding_models: dict[str, tuple[str | None, RunIds]] = PrivateAttr(default_factory=dict)
    _spans: SpanTree = PrivateAttr(default_factory=SpanTree)

    def __init__(self, engine: Engine, *, user_id: str | None = None,
                 session_id: str | None = None, project: str | None = None,
                 task_type: str | None = None, tags: Sequence[str] = (),
                 metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self._tracker = Tracker(engine, user_id=user_id, session_id=session_id,
                                project=project, task_type=task_type, tags=tags,
                                metadata=metadata)
        self._embedding_models = {}
        self._spans = SpanTree()

    @classmethod
    def class_name(cls) -> str:
        return "BudgetkitEventHandler"

    def register(self, dispatcher: Any = None) -> BudgetkitEventHandler:
        """Add this handler (and its error-catching span handler) to ``dispatcher``
        (the root dispatcher by default). Returns the handler."""
        if dispatcher is None:
            from llama_index.core.instrumentation import get_dispatcher

            dispatcher = get_dispatcher()
        dispatcher.add_event_handler(self)
        dispatcher.add_span_handler(_SpanHandler(tracker=self._tracker, spans=self._spans))
        return self

    # -- events --------------------------------------------------------------------------
    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        try:
            self._handle(event)
        except Exception:
            log_failure(f"{type(self).__name__}.handle({type(event).__name__})")

    def _handle(self, event: BaseEvent) -> None:
        tracker = self._tracker
        key = event.span_id or event.id_
        if isinstance(event, LLMChatStartEvent):
            if tracker.enter(key):
                tracker.begin(key, _model_of(event.model_dict),
                              tracker.attribution(key, "chat_completion", event.tags,
                                                  self._spans.run_ids(key)),
                              messages=to_openai_messages(event.messages), admit=False)
        elif isinstance(event, LLMCompletionStartEvent):
            if tracker.enter(key):
                tracker.begin(key, _model_of(event.model_dict),
                              tracker.attribution(key, "text_generation", event.tags,
                                                  self._spans.run_ids(key)),
                              prompt=event.prompt, admit=False)
        elif isinstance(event, LLMChatInProgressEvent):
            tracker.progress(key, event.response.delta, event.response.raw)
        elif isinstance(event, LLMCompletionInProgressEvent):
            tracker.progress(key, event.response.delta, event.response.raw)
        elif isinstance(event, LLMChatEndEvent):
            response = event.response
            if response is None:
                tracker.fail(key, None)
            else:
                tracker.finish(key, text=response.message.content, raw=response.raw,
                               additional_kwargs=response.additional_kwargs)
        elif isinstance(event, LLMCompletionEndEvent):
            completion = event.response
            tracker.finish(key, text=completion.text, raw=completion.raw,
                           additional_kwargs=completion.additional_kwargs)
        elif isinstance(event, ExceptionEvent):
            tracker.fail(key, event.exception)
        elif isinstance(event, EmbeddingStartEvent):
            self._embedding_models[key] = (_model_of(event.model_dict), self._spans.run_ids(key))
        elif isinstance(event, EmbeddingEndEvent):
            model, run = self._embedding_models.pop(key, (None, self._spans.run_ids(key)))
            operation = "query_embedding" if is_query_span(key) else "embedding"
            tracker.embedding(key, model, event.chunks, operation, event.tags, run)


class _SpanHandler(BaseSpanHandler[SimpleSpan]):
    """Feeds the handler's span tree (run ids) and sees calls that raise before their end
    event (no event reports those)."""

    tracker: Any = None
    spans: Any = None

    def __init__(self, tracker: Tracker, spans: SpanTree) -> None:
        super().__init__()
        self.tracker = tracker
        self.spans = spans

    @classmethod
    def class_name(cls) -> str:
        return "BudgetkitSpanHandler"

    def new_span(self, id_: str, bound_args: inspect.BoundArguments,
                 instance: Any = None, parent_span_id: str | None = None,
                 tags: dict[str, Any] | None = None, **kwargs: Any) -> SimpleSpan | None:
        self.spans.open(id_, parent_span_id)
        return None  # the base class keeps nothing: the tree is ours

    def prepare_to_exit_span(self, id_: str, bound_args: inspect.BoundArguments,
                             instance: Any = None, result: Any = None,
                             **kwargs: Any) -> SimpleSpan | None:
        self.spans.close(id_)
        return None

    def prepare_to_drop_span(self, id_: str, bound_args: inspect.BoundArguments,
                             instance: Any = None, err: BaseException | None = None,
                             **kwargs: Any) -> SimpleSpan | None:
        try:
            self.tracker.fail(id_, err)
        except Exception:
            log_failure("span drop")
        self.spans.close(id_)
        return None
