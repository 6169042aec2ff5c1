"""What every inner call of :class:`~llama_index.llms.budgetkit.RoutedLLM` goes through, in
the base class that holds the LLM's settings (:class:`_RoutedCalls`): the route decision,
the context fit to the chosen model's window, admission and settlement of the call (its
usage row's attribution and marks), the cascade's judging of an answer, one whole call
(:meth:`_RoutedCalls._once`) and the fallback around a call. Also the request's state
(:class:`_Call`, :class:`_Fitted`) and what turns an inner response into the routed one.

The eight LlamaIndex methods and the loops that drive these calls (cascade, streams) are
``RoutedLLM``'s, in ``_routed``. Kept in one class so a call, a streamed call and a cascade
attempt are fitted, attributed and settled alike.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.llm import LLM

import budgetkit
from budgetkit import ConfigurationError, ContextWindowExceeded
from budgetkit.fitting import FitReport
from budgetkit.routing import (Completion, asettle_completion, metered_call, prompt_text,
                               settle_completion)
from budgetkit.routing import RouteDecision
from budgetkit.routing import (check_routed_models, explain_fit, fit_summary,
                               largest_window_decision, routing_catalog)
from llama_index.callbacks.budgetkit import fit_messages
from llama_index.callbacks.budgetkit.messages import (response_model, to_openai_messages,
                                                      usage_from_raw)

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


class _RoutedCalls(LLM):
    """:class:`~llama_index.llms.budgetkit.RoutedLLM`'s settings and the making of one inner
    call (see the module docstring); the LlamaIndex methods are the subclass's."""

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

    # -- one call: judged, settled, with the fallback around it ---------------------------
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


# ---------------------------------------------------------------------------- helpers

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


def _mark(response: Response, call: _Call, reason: str) -> Response:
    marker: dict[str, Any] = {"model": call.model, "route_reason": reason,
                              "attempts": call.attempts, "request_id": call.request_id}
    fitted = call.fitted.get(call.model) if call.model else None
    if fitted is not None:
        marker["route_reason"] = fitted.explain(reason)
        marker["context_fit"] = fitted.summary
    response.additional_kwargs[ROUTED_MARKER] = marker
    return response
