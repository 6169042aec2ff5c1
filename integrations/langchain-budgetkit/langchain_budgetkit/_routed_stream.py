"""The streaming path of :class:`~langchain_budgetkit.RoutedChatModel`, and what turns an
inner model's answers into the routed model's messages, chunks and usage.

An inner stream (:class:`InnerStream`, :class:`AsyncInnerStream`) is admitted when it opens
(its first chunk is pulled inside the fallback's ``try``, so a stream that fails before any
output falls back like a call) and settled with the summed chunks' usage when it ends; a
stream that breaks releases its reservation. Chunks reporting running totals of usage are
settled with the last totals, not their sum (see ``_stream_usage``). OpenAI-compatible
inner models are asked for their stream's usage (``stream_usage=True``) unless the caller or
the model chose otherwise; a row estimated anyway says why (``usage_estimate_reason``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.outputs.chat_generation import merge_chat_generation_chunks

from budgetkit import ConfigurationError
from budgetkit.routing import Completion, asettle_completion, metered_call, settle_completion

from ._messages import message_text
from ._routed_run import PARSED_KEY, ROUTED_MARKER, RoutedCall
from ._stream_usage import ChunkUsage, stream_usage_request, usage_of_running_totals
from ._usage_parse import usage_from_metadata

__all__ = ["InnerStream", "AsyncInnerStream", "as_message", "as_chunk", "completion_of",
           "routed_result", "routed_chunk", "final_result", "emit_chunk", "aemit_chunk"]


class InnerStream:
    """One inner model's stream, admitted and settled like a single call."""

    def __init__(self, owner: Any, name: str, call: RoutedCall, reason: str,
                 manager: Any) -> None:
        self.owner, self.name, self.call, self.reason, self.manager = (
            owner, name, call, reason, manager)
        self.engine = owner._engine
        self.run_id = uuid.uuid4()  # the inner run's id, in its usage row too
        self.ticket: Any = None
        self.first: AIMessageChunk | None = None
        self.total: AIMessageChunk | None = None
        self.chunk_usage: list[ChunkUsage] = []  # LangChain sums chunks' usage: see below
        #: what the row says if the stream reports no usage (see stream_usage_request)
        self.estimate_reason: str | None = None

    def _start(self) -> None:
        call = self.call
        self.owner._fit(self.name, call)
        call.attempts += 1
        call.model = self.name
        self.reason = call.explain(self.name, self.reason)

    def open(self) -> None:
        call = self.call
        self._start()
        if self.engine is not None:
            self.ticket = self.engine.admit(
                self.name, **self.owner._admit_kwargs(self.name, call, self.reason, self.run_id))
        try:
            config = self.owner._config(self.name, call, self.reason, self.manager, self.run_id)
            self.iterator = iter(self.owner._inner(self.name, call).stream(
                call.prompt_for(self.name)[0], config=config, stop=call.stop,
                **self._stream_kwargs()))
            self.first = as_chunk(self._next(AIMessageChunk(content="")))
        except BaseException as exc:
            self._release(exc)
            raise

    def _next(self, default: Any = None) -> Any:
        # marked per step, not across yields: the consumer's own calls stay unmarked
        with metered_call(self.ticket is not None):
            return next(self.iterator, default)

    def __iter__(self) -> Iterator[AIMessageChunk]:
        assert self.first is not None
        self.total = self.first
        try:
            self._note(self.first)
            yield self.first
            while (piece := self._next()) is not None:
                chunk = as_chunk(piece)
                self.total = self.total + chunk
                self._note(chunk)
                yield chunk
        except BaseException as exc:
            self._release(exc)
            raise
        settle_completion(self.engine, self.ticket, self._completion(),
                          estimate_reason=self.estimate_reason)

    def _stream_kwargs(self) -> dict[str, Any]:
        """The call's keyword arguments, asking an OpenAI-compatible model for usage."""
        ask, self.estimate_reason = stream_usage_request(self.owner.models[self.name],
                                                         self.call.kwargs)
        return {**self.call.kwargs, **ask}

    def _note(self, chunk: AIMessageChunk) -> None:
        if chunk.usage_metadata:
            self.chunk_usage.append((chunk.usage_metadata, bool(message_text(chunk.content))))

    def _completion(self) -> Completion:
        """The summed stream as a completion, with the last running totals instead of
        their sum when the chunks report those (see ``_stream_usage``)."""
        assert self.total is not None
        return completion_of(self.total, usage_of_running_totals(self.chunk_usage))

    def _release(self, exc: BaseException) -> None:
        if self.ticket is not None:
            self.engine.release(self.ticket, error=exc)


class AsyncInnerStream(InnerStream):
    async def open(self) -> None:  # type: ignore[override]
        call = self.call
        self._start()
        if self.engine is not None:
            self.ticket = await self.engine.aadmit(
                self.name, **self.owner._admit_kwargs(self.name, call, self.reason, self.run_id))
        try:
            config = self.owner._config(self.name, call, self.reason, self.manager, self.run_id)
            self.aiterator = self.owner._inner(self.name, call).astream(
                call.prompt_for(self.name)[0], config=config, stop=call.stop,
                **self._stream_kwargs()).__aiter__()
            self.first = as_chunk(await self._anext() or AIMessageChunk(content=""))
        except BaseException as exc:
            self._release(exc)
            raise

    async def _anext(self) -> Any:
        with metered_call(self.ticket is not None):
            try:
                return await self.aiterator.__anext__()
            except StopAsyncIteration:
                return None

    async def __aiter__(self) -> AsyncIterator[AIMessageChunk]:
        assert self.first is not None
        self.total = self.first
        try:
            self._note(self.first)
            yield self.first
            while (piece := await self._anext()) is not None:
                chunk = as_chunk(piece)
                self.total = self.total + chunk
                self._note(chunk)
                yield chunk
        except BaseException as exc:
            self._release(exc)
            raise
        await asettle_completion(self.engine, self.ticket, self._completion(),
                                 estimate_reason=self.estimate_reason)


# ---------------------------------------------------------------------------- helpers

def as_message(output: Any) -> AIMessage:
    """An inner result as a message (structured output's parsed value rides along)."""
    if isinstance(output, dict) and "raw" in output and "parsed" in output:
        raw = output["raw"]
        extra = dict(raw.additional_kwargs)
        extra[PARSED_KEY] = {"parsed": output["parsed"],
                              "parsing_error": output.get("parsing_error")}
        return raw.model_copy(update={"additional_kwargs": extra})
    if isinstance(output, BaseMessage):
        return output if isinstance(output, AIMessage) else AIMessage(
            content=output.content, additional_kwargs=output.additional_kwargs,
            response_metadata=output.response_metadata)
    raise ConfigurationError(f"a routed model returned {type(output).__name__}, not a message")


def as_chunk(output: Any) -> AIMessageChunk:
    if isinstance(output, AIMessageChunk):
        return output
    message = as_message(output)
    return AIMessageChunk(content=message.content, additional_kwargs=message.additional_kwargs,
                          response_metadata=message.response_metadata,
                          tool_calls=message.tool_calls, usage_metadata=message.usage_metadata,
                          id=message.id)


def completion_of(message: BaseMessage,
                  usage_metadata: Mapping[str, Any] | None = None) -> Completion:
    """``message`` as a completion; ``usage_metadata`` replaces the message's own."""
    usage = usage_from_metadata(usage_metadata or getattr(message, "usage_metadata", None))
    metadata = message.response_metadata or {}
    reported = metadata.get("model_name") or metadata.get("model")
    return Completion(
        text=message_text(message.content),
        input_tokens=usage.input_tokens if usage else None,
        output_tokens=usage.output_tokens if usage else None,
        cached_input_tokens=usage.cached_input_tokens if usage else 0,
        cache_write_tokens=usage.cache_write_tokens if usage else 0,
        reasoning_tokens=usage.reasoning_tokens if usage else 0,
        model=reported if isinstance(reported, str) else None)


def _marker(call: RoutedCall, reason: str) -> dict[str, Any]:
    marker: dict[str, Any] = {
        "model": call.model, "route_reason": call.explain(call.model, reason),
        "attempts": call.attempts, "request_id": call.request_id}
    fitted = call.fitted.get(call.model) if call.model else None
    if fitted is not None:
        marker["context_fit"] = fitted.summary
    return marker


def routed_result(message: AIMessage, call: RoutedCall, reason: str) -> ChatResult:
    metadata = dict(message.response_metadata)
    metadata[ROUTED_MARKER] = _marker(call, reason)
    message = message.model_copy(update={"response_metadata": metadata})
    return ChatResult(generations=[ChatGeneration(message=message)])


def routed_chunk(piece: AIMessageChunk, call: RoutedCall, reason: str, *,
              first: bool = True) -> ChatGenerationChunk:
    if first:
        metadata = dict(piece.response_metadata)
        metadata[ROUTED_MARKER] = _marker(call, reason)
        piece = piece.model_copy(update={"response_metadata": metadata})
    return ChatGenerationChunk(message=piece)


def final_result(chunks: list[ChatGenerationChunk]) -> LLMResult:
    merged = merge_chat_generation_chunks(chunks)
    return LLMResult(generations=[[merged]] if merged is not None else [[]])


def emit_chunk(run_manager: Any, chunk: ChatGenerationChunk) -> None:
    if run_manager is not None:
        run_manager.on_llm_new_token(message_text(chunk.message.content), chunk=chunk)


async def aemit_chunk(run_manager: Any, chunk: ChatGenerationChunk) -> None:
    if run_manager is not None:
        await run_manager.on_llm_new_token(message_text(chunk.message.content), chunk=chunk)
