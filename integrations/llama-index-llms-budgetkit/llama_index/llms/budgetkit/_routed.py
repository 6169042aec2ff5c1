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
provider runs) and marks the call with ``budgetkit.routing._cascade.metered_call`` so a tracking
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

import uuid
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen,
                                              ChatResponseGen, CompletionResponse,
                                              CompletionResponseAsyncGen, CompletionResponseGen,
                                              LLMMetadata)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.llm import LLM

import budgetkit
from budgetkit import ConfigurationError, ContextWindowExceeded
from budgetkit.fitting import FitReport
from budgetkit.routing import (Completion, asettle_completion, metered_call, prompt_text,
                               settle_completion)
from budgetkit.routing import RouteDecision
from budgetkit.routing import (check_routed_models, explain_fit, fallback_reason,
                               fit_summary, largest_window_decision, routing_catalog)
from llama_index.callbacks.budgetkit import fit_messages
from llama_index.callbacks.budgetkit.messages import (response_model, to_openai_messages,
                                                      usage_from_raw)

__all__ = ["RoutedLLM", "ROUTED_MARKER"]

#: Key in a response's ``additional_kwargs`` describing how it was routed.
ROUTED_MARKER = "budgetkit_routed"
_ROUTING_KWARGS = ("model", "required_model", "task_type", "low_latency")

Response = Any  # ChatResponse | CompletionResponse
# An inner call: (the LLM, the messages or prompt it is sent) -> response, stream or awaitable
Invoke = Callable[[Any, Any], Any]


@dataclass
class _Fitted:
    """The prompt one model receives after ``fit_context`` cut it to its window."""

    model: str
    chat_messages: list[ChatMessage] | None  # a chat's kept messages
    messages: list[dict[str, Any]] | None    # the same, OpenAI form
    prompt: str | None                       # a complete's cut prompt
    report: FitReport

    @property
    def summary(self) -> dict[str, Any]:
        """What the usage row and the response marker record about the fit."""
        return fit_summary(self.model, self.report)

    def explain(self, reason: str) -> str:
        return explain_fit(reason, self.model, self.report)


@dataclass
class _Call:
    """One request: what the router sees and the attempt counter."""

    messages: list[dict[str, Any]] | None
    prompt: str | None
    kwargs: dict[str, Any]
    request_id: str
    required_model: str | None
    task_type: str | None
    low_latency: bool
    attempts: int = 0
    model: str | None = None
    chat_messages: list[ChatMessage] | None = None
    # fit_context: model -> its fitted prompt (None: the whole prompt fits that model)
    fitted: dict[str, _Fitted | None] = field(default_factory=dict)

    def inputs_for(self, model: str) -> Any:
        """What ``model`` is sent: the chat messages, or the prompt of a ``complete``."""
        fitted = self.fitted.get(model)
        if self.chat_messages is not None:
            return self.chat_messages if fitted is None else fitted.chat_messages
        return self.prompt if fitted is None else fitted.prompt

    def explain(self, model: str, reason: str) -> str:
        """``reason`` plus what fitting the prompt to ``model`` did, if anything."""
        fitted = self.fitted.get(model)
        return reason if fitted is None else fitted.explain(reason)


class RoutedLLM(LLM):
    """An LLM that sends each call to one of several LLMs (see the module docstring).

    With ``fit_context=True`` a prompt too long for the model a call goes to is fitted to
    its window (system messages and newest turns kept) instead of failing; the router's
    escalation to a larger-window model comes first. Off by default.
    """

    models: dict[str, Any] = Field(default_factory=dict,
                                   description="Catalog model name -> LlamaIndex LLM.")
    router: Any = Field(default=None, exclude=True)
    cascade: Any = Field(default=None, exclude=True)
    fallback: Any = Field(default=None, exclude=True)
    engine: Any = Field(default=None, exclude=True)
    default_model: str | None = None
    task_type: str | None = None
    low_latency: bool = False
    max_tokens: int | None = Field(
        default=None, description="Output tokens reserved for context fit and admission.")
    user_id: str | None = None
    project: str | None = None
    fit_context: bool = Field(
        default=False, description="Fit a prompt that overflows the chosen model's window.")
    reserve_output: int | None = Field(
        default=None, description="With fit_context: output tokens kept free in the window "
        "(default max_tokens, else the router's default_max_output_tokens).")
    _last_decision: RouteDecision | None = PrivateAttr(default=None)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._check_models()  # not a validator: pydantic would wrap the typed error

    def _check_models(self) -> None:
        if not self.models:
            raise ConfigurationError("RoutedLLM needs models={catalog name: LLM}")
        check_routed_models(self.models, router=self.router, cascade=self.cascade,
                            fallback=self.fallback, default_model=self.default_model,
                            reserve_output=self.reserve_output)

    @classmethod
    def class_name(cls) -> str:
        return "RoutedLLM"

    # -- what it will use --------------------------------------------------------------------
    @property
    def first_model(self) -> str:
        """The model a call without hints starts on."""
        if self.default_model:
            return self.default_model
        if self.cascade is not None:
            return self.cascade.models[0]
        if self.router is not None:
            return self.router.tiers[self.router.order[0]][0]
        return next(iter(self.models))

    @property
    def metadata(self) -> LLMMetadata:
        name = self.first_model
        inner = self.models[name].metadata
        return inner.model_copy(update={"model_name": name})

    @property
    def last_decision(self) -> RouteDecision | None:
        return self._last_decision

    @property
    def _engine(self) -> Any:
        return (self.engine or getattr(self.cascade, "engine", None)
                or getattr(self.router, "engine", None))

    # -- planning ----------------------------------------------------------------------------
    def _prepare(self, kwargs: dict[str, Any], *, messages: Sequence[ChatMessage] | None = None,
                 prompt: str | None = None) -> _Call:
        kwargs = dict(kwargs)
        required = kwargs.pop("model", None) or kwargs.pop("required_model", None)
        kwargs.pop("required_model", None)
        request_id = str(kwargs.pop("request_id", None) or uuid.uuid4().hex)
        task_type = kwargs.pop("task_type", None) or self.task_type
        low_latency = bool(kwargs.pop("low_latency", self.low_latency))
        return _Call(messages=to_openai_messages(messages) if messages is not None else None,
                     prompt=prompt, kwargs=kwargs, request_id=request_id,
                     required_model=required, task_type=task_type, low_latency=low_latency,
                     chat_messages=list(messages) if messages is not None else None)

    def _decide(self, call: _Call) -> RouteDecision:
        required = call.required_model
        if required is not None and required not in self.models:
            raise ConfigurationError(
                f"model {required!r} is not one of the routed models: {', '.join(self.models)}")
        if self.router is not None:
            try:
                decision = self.router.route(
                    call.prompt if call.messages is None else None, messages=call.messages,
                    required_model=required, task_type=call.task_type,
                    low_latency=call.low_latency, max_output_tokens=self._reserve(),
                    user_id=self.user_id, project=self.project)
            except ContextWindowExceeded as exc:
                if not self.fit_context:
                    raise
                decision = largest_window_decision(self.router, self._catalog, required, exc)
        elif required is not None:
            decision = RouteDecision(required, None, (f"required model {required}",))
        else:
            decision = RouteDecision(self.first_model, None, (f"default model {self.first_model}",))
        self._last_decision = decision
        return decision

    # -- context fit ----------------------------------------------------------------------
    @property
    def _catalog(self) -> Any:
        return routing_catalog(self.router, self._engine)

    def _reserve(self) -> int | None:
        """Output tokens the router's window check keeps free (the fit keeps the same)."""
        if self.fit_context and self.reserve_output is not None:
            return self.reserve_output
        return self.max_tokens

    def _fit(self, name: str, call: _Call) -> None:
        """With ``fit_context``, fit the prompt to ``name``'s window once per model."""
        if not self.fit_context or name in call.fitted:
            return
        catalog = self._catalog
        if not catalog.get(name).context_window:  # the catalog does not know: nothing to fit to
            call.fitted[name] = None
            return
        reserve = self._reserve()
        if reserve is None and self.router is not None:
            reserve = self.router.default_max_output_tokens
        fitted: _Fitted | None
        if call.chat_messages is not None:
            kept, report = fit_messages(call.chat_messages, name, reserve_output=reserve,
                                        catalog=catalog)
            fitted = _Fitted(name, kept, to_openai_messages(kept), None, report)
        else:  # a complete prompt is one user message: only cutting it can help
            cut, report = budgetkit.fit_messages([{"role": "user", "content": call.prompt}],
                                                 name, reserve_output=reserve, catalog=catalog)
            fitted = _Fitted(name, None, None, cut[0]["content"], report)
        call.fitted[name] = fitted if report.dropped or report.truncated else None

    # -- admission ----------------------------------------------------------------------
    # _admit / _aadmit start every inner call: they fit the prompt to the model (with
    # fit_context) before the row is admitted, so the row counts what the model is sent.
    def _admit(self, name: str, call: _Call, reason: str) -> Any:
        engine = self._engine
        self._fit(name, call)
        call.attempts += 1
        call.model = name
        if engine is None:
            return None
        return engine.admit(name, **self._admit_kwargs(name, call, reason))

    async def _aadmit(self, name: str, call: _Call, reason: str) -> Any:
        engine = self._engine
        self._fit(name, call)
        call.attempts += 1
        call.model = name
        if engine is None:
            return None
        return await engine.aadmit(name, **self._admit_kwargs(name, call, reason))

    def _admit_kwargs(self, name: str, call: _Call, reason: str) -> dict[str, Any]:
        attribution = {key: value for key, value in (
            ("user_id", self.user_id), ("project", self.project),
            ("task_type", call.task_type)) if value is not None}
        metadata: dict[str, Any] = {"routed": True}
        fitted = call.fitted.get(name)
        if fitted is not None:
            metadata["context_fit"] = fitted.summary
        messages, prompt = call.messages, call.prompt
        if fitted is not None:
            messages, prompt = fitted.messages, fitted.prompt
        return dict(attribution, messages=messages, prompt=prompt,
                    max_output_tokens=self.max_tokens, request_id=call.request_id,
                    attempt=call.attempts, route_reason=call.explain(name, reason),
                    operation_type="chat_completion" if call.messages is not None
                    else "text_generation", metadata=metadata)

    def _finish(self, ticket: Any, response: Response, call: _Call, reason: str) -> Response:
        settle_completion(self._engine, ticket, _completion(response))
        return _mark(response, call, reason)

    def _release(self, ticket: Any, exc: BaseException) -> None:
        if ticket is not None:
            self._engine.release(ticket, error=exc)

    # -- the drivers: one call, the cascade loop, the fallback -------------------------------
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

    def _failures(self, call: _Call, response: Response) -> list[str]:
        """Why the cascade's checks reject ``response`` (checks that need the question get
        the call's prompt or messages as text)."""
        return self.cascade.evaluate(_text(response), prompt_text(call.prompt, call.messages))

    def _judge(self, verdicts: list[list[str]] | None, call: _Call, response: Response,
               ticket: Any) -> None:
        """Check the answer before its attempt is settled, so the verdict on the cheapest
        answer rides in that usage row (``Router.fit_from_ledger`` learns from it)."""
        if verdicts is None:
            return
        verdicts.append(self._failures(call, response))
        if ticket is not None and call.attempts == 1:
            ticket.metadata.update(self.cascade.verdict_metadata(
                prompt_text(call.prompt, call.messages), verdicts[-1]))

    def _attempt_reason(self, number: int, previous: tuple[str, list[str]] | None) -> str:
        from budgetkit.routing import Attempt

        before = None if previous is None else Attempt(number - 1, previous[0], "", None,
                                                       previous[1])
        return self.cascade.attempt_reason(number, before)

    def _once(self, name: str, call: _Call, reason: str, invoke: Invoke,
              verdicts: list[list[str]] | None = None) -> Response:
        ticket = self._admit(name, call, reason)
        try:
            with metered_call(ticket is not None):
                response = invoke(self.models[name], call.inputs_for(name))
        except BaseException as exc:
            self._release(ticket, exc)
            raise
        self._judge(verdicts, call, response, ticket)
        return self._finish(ticket, response, call, reason)

    async def _aonce(self, name: str, call: _Call, reason: str, invoke: Invoke,
                     verdicts: list[list[str]] | None = None) -> Response:
        ticket = await self._aadmit(name, call, reason)
        try:
            with metered_call(ticket is not None):
                response = await invoke(self.models[name], call.inputs_for(name))
        except BaseException as exc:
            self._release(ticket, exc)
            raise
        self._judge(verdicts, call, response, ticket)
        await asettle_completion(self._engine, ticket, _completion(response))
        return _mark(response, call, reason)

    def _with_fallback(self, fn: Callable[[str], Any], name: str) -> Any:
        return fn(name) if self.fallback is None else self.fallback.call(fn, prefer=name)

    async def _awith_fallback(self, fn: Callable[[str], Any], name: str) -> Any:
        if self.fallback is None:
            return await fn(name)
        return await self.fallback.acall(fn, prefer=name)

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


def _text(response: Response) -> str:
    if isinstance(response, ChatResponse):
        return response.message.content or ""
    return getattr(response, "text", "") or ""


def _completion(response: Response) -> Completion:
    """The usage of a response (for a stream: its last chunk, which holds the whole text)."""
    usage = usage_from_raw(response.raw, response.additional_kwargs)
    return Completion(
        text=_text(response),
        input_tokens=usage.input_tokens if usage else None,
        output_tokens=usage.output_tokens if usage else None,
        cached_input_tokens=usage.cached_input_tokens if usage else 0,
        cache_write_tokens=usage.cache_write_tokens if usage else 0,
        reasoning_tokens=usage.reasoning_tokens if usage else 0,
        model=response_model(response.raw))


def _as_delta(response: Response) -> Response:
    """A whole answer served as a one-piece stream: its delta is all of its text."""
    if getattr(response, "delta", None) is None:
        response.delta = _text(response)
    return response


def _mark(response: Response, call: _Call, reason: str) -> Response:
    marker: dict[str, Any] = {"model": call.model, "route_reason": reason,
                              "attempts": call.attempts, "request_id": call.request_id}
    fitted = call.fitted.get(call.model) if call.model else None
    if fitted is not None:
        marker["route_reason"] = fitted.explain(reason)
        marker["context_fit"] = fitted.summary
    response.additional_kwargs[ROUTED_MARKER] = marker
    return response
