"""A LlamaIndex LLM that routes, cascades and falls back across other LLMs.

    from llama_index.core import Settings
    from llama_index.llms.budgetkit import RoutedLLM

    Settings.llm = RoutedLLM(
        models={"gpt-4o-mini": OpenAI(model="gpt-4o-mini"), "gpt-4o": OpenAI(model="gpt-4o")},
        router=budgetkit.Router({"low": "gpt-4o-mini", "high": "gpt-4o"}),
        engine=engine,
    )

Per call ``router`` picks the model, or ``cascade`` tries its models cheapest first until an
answer passes its checks, or ``default_model`` answers; ``fallback`` wraps every call
(a ``BudgetExceeded`` is never retried nor sent to another model). Keyword arguments
``model=`` (a required model), ``task_type=`` and ``low_latency=`` steer the router and
are not forwarded.

The eight methods (chat, complete, their stream and async forms) carry *no* LlamaIndex
callback decorators: the inner LLM emits the instrumentation events and legacy callbacks
of the real call, so budgetkit's LlamaIndex handlers (and any tracer) record the model that
actually ran, once. With an ``engine`` this LLM admits and settles each inner call itself
(rows with request id, attempt number and route reason; a budget stops a call before the
provider runs) and marks the call with ``budgetkit.routing.metered_call`` so a tracking
handler does not record it again. Responses carry ``additional_kwargs["budgetkit_routed"]``
(model, reason, attempts, request id).

``metadata`` describes the model a call without hints starts on (the cheapest tier, the
cascade's first model, or ``default_model``), with ``model_name`` set to its catalog name;
:attr:`last_decision` holds the most recent routing decision.

Context fit (``fit_context=True``; off by default). The router comes first: it sends a long
prompt to the cheapest model whose window takes it. Only when no routed model's window
takes the prompt (or the required model is too small) does ``fit_context`` step in: instead
of raising :class:`budgetkit.ContextWindowExceeded`, the call goes to the routed model with
the largest window (or the required one). Before *any* inner call (router, cascade attempt,
fallback target or default model), a prompt that overflows that model's window is fitted
with :func:`llama_index.callbacks.budgetkit.fit_messages`: system messages and the newest
turns kept, tool calls kept with their results, the newest user message (or a ``complete``
prompt) cut in the middle only when it alone is too long. Counting is exact;
``reserve_output`` (default ``max_tokens``, else the router's ``default_max_output_tokens``)
stays free for the reply. The fit is explained in the route reason, in the usage row's
``metadata["context_fit"]`` and in the response marker's ``context_fit`` (model,
tokens_before, tokens_after, limit, dropped, truncated).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from functools import partial
from typing import Any

from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen,
                                              ChatResponseGen, CompletionResponse,
                                              CompletionResponseAsyncGen, CompletionResponseGen,
                                              LLMMetadata)

from budgetkit.routing import Completion, asettle_completion, metered_call, settle_completion
from budgetkit.routing import RouteDecision
from budgetkit.routing import fallback_reason

from ._routed_calls import (ROUTED_MARKER, Invoke, Response, _Call, _completion, _mark,
                            _RoutedCalls, _text)

__all__ = ["RoutedLLM", "ROUTED_MARKER"]


class RoutedLLM(_RoutedCalls):
    """An LLM that sends each call to one of several LLMs (see the module docstring).

    With ``fit_context=True`` a prompt too long for the model a call goes to is fitted to
    its window (system messages and newest turns kept) instead of failing; the router's
    escalation to a larger-window model comes first. Off by default.
    """

    # Settings, route decision, context fit and one inner call: see _RoutedCalls.

    @classmethod
    def class_name(cls) -> str:
        return "RoutedLLM"

    # -- what it will use --------------------------------------------------------------------
    @property
    def metadata(self) -> LLMMetadata:
        name = self.first_model
        inner = self.models[name].metadata
        return inner.model_copy(update={"model_name": name})

    @property
    def last_decision(self) -> RouteDecision | None:
        return self._last_decision

    # -- the drivers: the cascade loop around one call (_RoutedCalls._once) --------------
    def _run(self, call: _Call, invoke: Invoke) -> Response:
        if self.cascade is None:
            decision = self._decide(call)
            return self._with_fallback(
                lambda name: self._once(name, call, fallback_reason(decision, name), invoke),
                decision.model)
        previous: tuple[str, list[str]] | None = None
        response = None
        for number, name in enumerate(self.cascade.models, start=1):
            reason = self._attempt_reason(number, previous)
            verdicts: list[list[str]] = []
            response = self._with_fallback(
                partial(self._once, call=call, reason=reason, invoke=invoke,
                        verdicts=verdicts), name)
            failures = verdicts[-1]
            if not failures:
                break
            previous = (name, failures)
        return response

    async def _arun(self, call: _Call, invoke: Invoke) -> Response:
        if self.cascade is None:
            decision = self._decide(call)
            return await self._awith_fallback(
                lambda name: self._aonce(name, call, fallback_reason(decision, name), invoke),
                decision.model)
        previous: tuple[str, list[str]] | None = None
        response = None
        for number, name in enumerate(self.cascade.models, start=1):
            reason = self._attempt_reason(number, previous)
            verdicts: list[list[str]] = []
            response = await self._awith_fallback(
                partial(self._aonce, call=call, reason=reason, invoke=invoke,
                        verdicts=verdicts), name)
            failures = verdicts[-1]
            if not failures:
                break
            previous = (name, failures)
        return response

    # -- chat and complete ----------------------------------------------------------------
    # Each inner call gets ``(llm, inputs)``: the messages or prompt that model is sent,
    # which fit_context may have cut to its window.
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._prepare(kwargs, messages=messages)
        return self._run(call, lambda llm, msgs: llm.chat(msgs, **call.kwargs))

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = self._prepare(kwargs, prompt=prompt)
        return self._run(call, lambda llm, text: llm.complete(text, formatted=formatted,
                                                              **call.kwargs))

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._prepare(kwargs, messages=messages)
        return await self._arun(call, lambda llm, msgs: llm.achat(msgs, **call.kwargs))

    async def acomplete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponse:
        call = self._prepare(kwargs, prompt=prompt)
        return await self._arun(call, lambda llm, text: llm.acomplete(text, formatted=formatted,
                                                                      **call.kwargs))

    # -- streaming ------------------------------------------------------------------------
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._prepare(kwargs, messages=messages)
        return self._stream(call, lambda llm, msgs: llm.stream_chat(msgs, **call.kwargs),
                            lambda llm, msgs: llm.chat(msgs, **call.kwargs))

    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        call = self._prepare(kwargs, prompt=prompt)
        return self._stream(
            call,
            lambda llm, text: llm.stream_complete(text, formatted=formatted, **call.kwargs),
            lambda llm, text: llm.complete(text, formatted=formatted, **call.kwargs))

    async def astream_chat(self, messages: Sequence[ChatMessage],
                           **kwargs: Any) -> ChatResponseAsyncGen:
        call = self._prepare(kwargs, messages=messages)
        return await self._astream(
            call, lambda llm, msgs: llm.astream_chat(msgs, **call.kwargs),
            lambda llm, msgs: llm.achat(msgs, **call.kwargs))

    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        call = self._prepare(kwargs, prompt=prompt)
        return await self._astream(
            call,
            lambda llm, text: llm.astream_complete(text, formatted=formatted, **call.kwargs),
            lambda llm, text: llm.acomplete(text, formatted=formatted, **call.kwargs))

    def _stream_target(self, call: _Call, whole: Invoke) -> tuple[Any, str]:
        """(model to stream or an accepted buffered response, reason)."""
        if self.cascade is None:
            decision = self._decide(call)
            return decision.model, fallback_reason(decision, decision.model)
        previous: tuple[str, list[str]] | None = None
        for number, name in enumerate(self.cascade.models, start=1):
            reason = self._attempt_reason(number, previous)
            if number == len(self.cascade.models):
                return name, reason
            response = self._with_fallback(
                partial(self._once, call=call, reason=reason, invoke=whole), name)
            failures = self._failures(call, response)
            if not failures:
                return response, reason
            previous = (name, failures)
        raise AssertionError("unreachable")  # pragma: no cover

    def _stream(self, call: _Call, open_stream: Invoke, whole: Invoke
                ) -> Generator[Response, None, None]:
        target, reason = self._stream_target(call, whole)
        if not isinstance(target, str):  # the cascade accepted a cheap, buffered answer
            def single() -> Generator[Response, None, None]:  # LlamaIndex wants a generator
                yield _as_delta(target)
            return single()

        def opener(name: str) -> tuple[Any, Iterator[Response], Response | None]:
            ticket = self._admit(name, call, reason)
            try:
                with metered_call(ticket is not None):
                    iterator = iter(open_stream(self.models[name], call.inputs_for(name)))
                    first = next(iterator, None)  # inside the fallback's try
            except BaseException as exc:
                self._release(ticket, exc)
                raise
            return ticket, iterator, first

        ticket, iterator, first = self._with_fallback(opener, target)

        def gen() -> Generator[Response, None, None]:
            last = first
            try:
                if first is not None:
                    yield _mark(first, call, reason)
                while True:
                    with metered_call(ticket is not None):
                        piece = next(iterator, None)
                    if piece is None:
                        break
                    last = piece
                    yield _mark(piece, call, reason)
            except BaseException as exc:
                self._release(ticket, exc)
                raise
            if last is not None:
                settle_completion(self._engine, ticket, _completion(last))
            elif ticket is not None:
                settle_completion(self._engine, ticket, Completion(text=""))

        return gen()

    async def _astream(self, call: _Call, open_stream: Invoke,
                       whole: Invoke) -> AsyncGenerator[Response, None]:
        target, reason = await self._astream_target(call, whole)
        if not isinstance(target, str):
            async def single() -> AsyncGenerator[Response, None]:
                yield _as_delta(target)
            return single()

        async def opener(name: str) -> tuple[Any, Any, Response | None]:
            ticket = await self._aadmit(name, call, reason)
            try:
                with metered_call(ticket is not None):
                    iterator = (await open_stream(self.models[name],
                                                  call.inputs_for(name))).__aiter__()
                    first = await _anext(iterator)
            except BaseException as exc:
                self._release(ticket, exc)
                raise
            return ticket, iterator, first

        ticket, iterator, first = await self._awith_fallback(opener, target)

        async def gen() -> AsyncGenerator[Response, None]:
            last = first
            try:
                if first is not None:
                    yield _mark(first, call, reason)
                while True:
                    with metered_call(ticket is not None):
                        piece = await _anext(iterator)
                    if piece is None:
                        break
                    last = piece
                    yield _mark(piece, call, reason)
            except BaseException as exc:
                self._release(ticket, exc)
                raise
            await asettle_completion(self._engine, ticket, _completion(last) if last is not None
                                     else Completion(text=""))

        return gen()

    async def _astream_target(self, call: _Call, whole: Invoke) -> tuple[Any, str]:
        if self.cascade is None:
            decision = self._decide(call)
            return decision.model, fallback_reason(decision, decision.model)
        previous: tuple[str, list[str]] | None = None
        for number, name in enumerate(self.cascade.models, start=1):
            reason = self._attempt_reason(number, previous)
            if number == len(self.cascade.models):
                return name, reason
            response = await self._awith_fallback(
                partial(self._aonce, call=call, reason=reason, invoke=whole), name)
            failures = self._failures(call, response)
            if not failures:
                return response, reason
            previous = (name, failures)
        raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------- helpers

async def _anext(iterator: Any) -> Any:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


def _as_delta(response: Response) -> Response:
    """A whole answer served as a one-piece stream: its delta is all of its text."""
    if getattr(response, "delta", None) is None:
        response.delta = _text(response)
    return response
