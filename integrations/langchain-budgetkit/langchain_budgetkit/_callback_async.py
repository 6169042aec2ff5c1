"""The asyncio twin of :class:`~langchain_budgetkit.BudgetkitCallbackHandler`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult

from budgetkit import Engine

from ._runs import _log_failure, _Run
from ._tracker import _Tracker

__all__ = ["AsyncBudgetkitCallbackHandler"]


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

    def __repr__(self) -> str:
        return (f"AsyncBudgetkitCallbackHandler(calls={self.calls}, "
                f"tokens={self.total_tokens}, cost=${self.cost:.6f})")

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
    on_tool_error = on_retriever_error = on_chain_error

    async def on_chat_model_start(self, serialized: dict[str, Any],
                                  messages: list[list[BaseMessage]], *, run_id: UUID,
                                  parent_run_id: UUID | None = None,
                                  tags: list[str] | None = None,
                                  metadata: dict[str, Any] | None = None,
                                  **kwargs: Any) -> None:
        try:
            run = self._begin(run_id, parent_run_id, tags, metadata, kwargs, serialized,
                              "chat_completion", tuple(messages[0]) if messages else ())
        except Exception:
            _log_failure("on_chat_model_start")
            return
        if run is not None and self._admits_at_start:
            await self._aadmit(run_id, run)

    async def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *,
                           run_id: UUID, parent_run_id: UUID | None = None,
                           tags: list[str] | None = None,
                           metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            run = self._begin(run_id, parent_run_id, tags, metadata, kwargs, serialized,
                              "text_generation", prompts[0] if prompts else "")
        except Exception:
            _log_failure("on_llm_start")
            return
        if run is not None and self._admits_at_start:
            await self._aadmit(run_id, run)

    async def _aadmit(self, run_id: UUID, run: _Run) -> None:
        key = self._lane_key(run)
        if self._admit_in_lane(run, key):  # in memory: fine on the event loop
            return
        kwargs = self._admission(run_id, run)
        if kwargs is None:
            return
        try:
            ticket = await self.engine.aadmit(run.model, **kwargs)  # type: ignore[arg-type]
        except Exception as exc:
            self._admit_failed(run_id, run, exc)
        else:
            self._admitted(run, ticket)
            self._lanes.remember(key, ticket)

    async def on_llm_new_token(self, token: Any, *, run_id: UUID, chunk: Any = None,
                               **kwargs: Any) -> None:
        try:
            check = self._on_token(token, run_id, chunk)
        except Exception:
            _log_failure("on_llm_new_token")
            return
        if check is not None:
            self.engine.check_stream(*check)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, response, None)
        except Exception:
            _log_failure("on_llm_end")

    async def on_llm_error(self, error: BaseException, *, run_id: UUID,
                           **kwargs: Any) -> None:
        try:
            self._end(run_id, None, error)
        except Exception:
            _log_failure("on_llm_error")
