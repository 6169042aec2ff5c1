"""Run ids for LlamaIndex calls: the call's own id, its parent's and its root's.

A query, a chat turn or an agent run is a tree; every LLM and embedding row of one tree
carries the same ``root_run_id`` (the outermost node), so the run can be summed and a
``run`` budget applies to all of it, as LangChain rows do with their root run.

- Instrumentation path: nodes are *spans*. The dispatcher names each span
  ``<Class>.<method>-<uuid>`` and passes the enclosing span as ``parent_span_id`` to span
  handlers only (events carry just their own ``span_id``), so :class:`SpanTree` is fed by
  the span handler that :meth:`BudgetkitEventHandler.register` adds.
- Legacy path: nodes are ``CallbackManager`` events. LLM and embedding events are leaves;
  their ancestors (query, retrieve, synthesize, ... events, from whichever manager fired
  them) are on LlamaIndex's ``global_stack_trace`` context variable while they run. A chat
  engine's turn opens no event around its retrieve and LLM events, only a *trace*
  (``as_trace("chat")``), whose name is not unique: the handler that sees the outermost
  trace start mints ``<trace name>-<uuid>`` for it (:func:`start_legacy_trace`), and that
  is the root of everything inside.

A streaming query engine (``streaming=True``) starts its LLM call only when the response
is consumed, after the query has returned: that row is then a run of its own (its root is
the LLM's span or trace), not part of the query's. To sum such a query, wrap the query and
the consumption in ``attribution(request_id=...)``.

Stored ids are at most :data:`RUN_ID_MAX` characters (the ledger's column width): a longer
span id drops its class name (``<method>-<uuid>``), then, if still too long, keeps the uuid.
"""

from __future__ import annotations

import threading
import uuid
from contextvars import ContextVar
from typing import NamedTuple

__all__ = ["RunIds", "SpanTree", "legacy_run_ids", "start_legacy_trace", "end_legacy_trace",
           "stored_run_id", "RUN_ID_MAX"]

RUN_ID_MAX = 64
_UUID_LENGTH = 36


class RunIds(NamedTuple):
    run_id: str | None
    parent_run_id: str | None
    root_run_id: str | None

    def as_kwargs(self) -> dict[str, str | None]:
        return {"run_id": stored_run_id(self.run_id),
                "parent_run_id": stored_run_id(self.parent_run_id),
                "root_run_id": stored_run_id(self.root_run_id)}


def stored_run_id(node_id: str | None) -> str | None:
    """``node_id`` shortened to fit the ledger's run id columns (see the module docs)."""
    if node_id is None or len(node_id) <= RUN_ID_MAX:
        return node_id
    method_and_uuid = node_id.rsplit(".", 1)[-1]
    if len(method_and_uuid) <= RUN_ID_MAX:
        return method_and_uuid
    return node_id[-_UUID_LENGTH:]


class SpanTree:
    """Parent and root of every open instrumentation span (fed by a span handler).

    The root is resolved when a span opens (its parent's root, or itself), so looking it
    up is one dict read. Spans are forgotten when they close; a span whose parent closed
    before it opened (a stream consumed after its query returned) names that parent as
    its root, the best that is still known.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[str | None, str]] = {}
        self._lock = threading.Lock()

    def open(self, span_id: str, parent_span_id: str | None) -> None:
        if parent_span_id is None:
            root = span_id
        else:
            known = self._open.get(parent_span_id)
            root = known[1] if known is not None else parent_span_id
        with self._lock:
            self._open[span_id] = (parent_span_id, root)

    def close(self, span_id: str) -> None:
        with self._lock:
            self._open.pop(span_id, None)

    def run_ids(self, span_id: str) -> RunIds:
        """The ids of ``span_id``; parent and root are unknown (None) for a span this tree
        did not see open (the handler was added without its span handler)."""
        known = self._open.get(span_id)
        if known is None:
            return RunIds(span_id, None, None)
        return RunIds(span_id, known[0], known[1])

    def __len__(self) -> int:
        return len(self._open)


# The id minted for the outermost legacy trace open in this context (None outside one).
_legacy_trace: ContextVar[str | None] = ContextVar("budgetkit_llama_legacy_trace", default=None)


def start_legacy_trace(trace_name: str | None) -> None:
    """``CallbackManager`` calls its handlers' ``start_trace`` for the outermost trace only."""
    _legacy_trace.set(f"{trace_name or 'trace'}-{uuid.uuid4()}")


def end_legacy_trace() -> None:
    _legacy_trace.set(None)


def legacy_run_ids(event_id: str, parent_id: str | None) -> RunIds:
    """Ids of a legacy ``CallbackManager`` event, read while it starts."""
    from llama_index.core.callbacks.base import global_stack_trace
    from llama_index.core.callbacks.schema import BASE_TRACE_EVENT

    open_events = [node for node in global_stack_trace.get() if node != BASE_TRACE_EVENT]
    trace = _legacy_trace.get()
    parent = parent_id if parent_id and parent_id != BASE_TRACE_EVENT else None
    if parent is None:
        parent = open_events[-1] if open_events else trace
    root = trace or (open_events[0] if open_events else event_id)
    return RunIds(event_id, parent, root)
