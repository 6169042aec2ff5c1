"""Attribution for LlamaIndex calls: who a call is for, set around a block of code.

LlamaIndex has no per-call metadata like LangChain's ``config={"metadata": ...}``, so the
handlers read attribution from a context variable (it follows threads started with
``copy_context`` and asyncio tasks):

    with attribution(user_id="alice", session_id="s-42", tags=["support"]):
        query_engine.query("Where is my order?")

Nested blocks override single fields and add tags and metadata. LlamaIndex's own
``instrument_tags({...})`` keys with the same names (``user_id``, ...) are honoured too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["attribution", "current_attribution", "ATTRIBUTION_KEYS"]

ATTRIBUTION_KEYS = ("user_id", "session_id", "project", "operation_type", "task_type",
                    "request_id")

_current: ContextVar[Mapping[str, Any]] = ContextVar("budgetkit_llama_index_attribution",
                                                     default={})


@contextmanager
def attribution(*, user_id: str | None = None, session_id: str | None = None,
                project: str | None = None, operation_type: str | None = None,
                task_type: str | None = None, request_id: str | None = None,
                tags: Sequence[str] = (), metadata: Mapping[str, Any] | None = None
                ) -> Iterator[Mapping[str, Any]]:
    """Attribute every LlamaIndex call made inside the block (see the module docs)."""
    outer = _current.get()
    fields = {key: value for key, value in (
        ("user_id", user_id), ("session_id", session_id), ("project", project),
        ("operation_type", operation_type), ("task_type", task_type),
        ("request_id", request_id)) if value is not None}
    merged: dict[str, Any] = {**outer, **fields}
    merged["tags"] = tuple(outer.get("tags", ())) + tuple(
        tag for tag in tags if tag not in outer.get("tags", ()))
    merged["metadata"] = {**outer.get("metadata", {}), **(metadata or {})}
    token = _current.set(merged)
    try:
        yield merged
    finally:
        _current.reset(token)


def current_attribution() -> Mapping[str, Any]:
    """The attribution of the innermost :func:`attribution` block (empty outside)."""
    return _current.get()
