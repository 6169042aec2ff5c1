"""What every inner call of :class:`~langchain_budgetkit.RoutedChatModel` goes through, in
the base class that holds the model's settings (:class:`_RoutedCalls`): the route decision,
the context fit to the chosen model's window, the admitted and settled call to that model
(its usage row's attribution and marks), the cascade's judging of an answer, and the
fallback around a call.

Both of the routed model's paths use it: ``_generate`` / ``_agenerate`` in ``_routed``, and
the inner streams of ``_routed_stream`` (which fit, admit and configure their call through
the same methods). Kept in one class so a call, a streamed call and a cascade attempt are
fitted, attributed and settled alike.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import ConfigDict, Field

from budgetkit import ConfigurationError, ContextWindowExceeded
from budgetkit.routing import asettle_completion, metered_call, prompt_text, settle_completion
from budgetkit.routing import RouteDecision
from budgetkit.routing import check_routed_models, largest_window_decision, routing_catalog

from ._fitting import fit_messages
from ._messages import message_text, to_openai_messages
from ._routed_run import METERED_MARKER, PARSED_KEY, FittedPrompt, RoutedCall, run_attribution
from ._routed_stream import as_message, completion_of

_TOOLS_KEY = "budgetkit_tools"            # bound by bind_tools, applied to the chosen model
_STRUCTURED_KEY = "budgetkit_structured"  # bound by with_structured_output


class _RoutedCalls(BaseChatModel):
    """:class:`~langchain_budgetkit.RoutedChatModel`'s settings and the making of one inner
    call (see the module docstring); the LangChain entry points are the subclass's."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore")

    models: dict[str, Any] = Field(default_factory=dict)
    """Catalog model name → the LangChain chat model that serves it."""
    router: Any = None
    cascade: Any = None
    fallback: Any = None
    engine: Any = None
    default_model: str | None = None
    """Used when there is no router or cascade (default: the first model)."""
    task_type: str | None = None
    low_latency: bool = False
    max_tokens: int | None = None
    """Output tokens reserved when routing for context fit and admitting (not forwarded)."""
    temperature: float | None = None
    stop: list[str] | None = None
    fit_context: bool = False
    """Fit a prompt that overflows the chosen model's window instead of failing."""
    reserve_output: int | None = None
    """With ``fit_context``: output tokens kept free in the window (default ``max_tokens``,
    else the router's ``default_max_output_tokens``, else the fitter's default)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._check_models()  # here, not in a validator: pydantic would wrap the typed error

    def _check_models(self) -> None:
        if not self.models:
            raise ConfigurationError("RoutedChatModel needs models={catalog name: chat model}")
        check_routed_models(self.models, router=self.router, cascade=self.cascade,
                            fallback=self.fallback, default_model=self.default_model,
                            reserve_output=self.reserve_output)

    @property
    def _engine(self) -> Any:
        return (self.engine or getattr(self.cascade, "engine", None)
                or getattr(self.router, "engine", None))

    # -- planning -----------------------------------------------------------------------------
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None,
                 run_manager: Any, kwargs: dict[str, Any]) -> RoutedCall:
        kwargs = dict(kwargs)
        required = kwargs.pop("model", None) or kwargs.pop("required_model", None)
        kwargs.pop("required_model", None)
        metadata = {**(getattr(run_manager, "inheritable_metadata", None) or {}),
                    **(getattr(run_manager, "metadata", None) or {})}
        task_type = kwargs.pop("task_type", None) or metadata.get("task_type") or self.task_type
        low_latency = bool(kwargs.pop("low_latency", self.low_latency))
        attribution, request_id = run_attribution(run_manager, task_type)
        tools = kwargs.pop(_TOOLS_KEY, None)
        structured = kwargs.pop(_STRUCTURED_KEY, None)
        return RoutedCall(messages=messages, openai_messages=to_openai_messages(messages),
                          stop=stop or self.stop, kwargs=kwargs, request_id=request_id,
                          attribution=attribution, required_model=required,
                          task_type=task_type, low_latency=low_latency, tools=tools,
                          structured=structured)

    def _decide(self, call: RoutedCall, run_manager: Any) -> RouteDecision:
        required = call.required_model
        if required is not None and required not in self.models:
            raise ConfigurationError(
                f"model {required!r} is not one of the routed models: {', '.join(self.models)}")
        if self.router is not None:
            try:
                return self.router.route(
                    messages=call.openai_messages, required_model=required,
                    task_type=call.task_type, low_latency=call.low_latency,
                    max_output_tokens=self._reserve(),
                    user_id=call.attribution.fields.get("user_id"),
                    project=call.attribution.fields.get("project"),
                    tags=tuple(getattr(run_manager, "tags", None) or ()))
            except ContextWindowExceeded as exc:
                if not self.fit_context:
                    raise
                return largest_window_decision(self.router, self._catalog, required, exc)
        if required is not None:
            return RouteDecision(required, None, (f"required model {required}",))
        model = self.default_model or next(iter(self.models))
        return RouteDecision(model, None, (f"default model {model}",))

    # -- context fit ----------------------------------------------------------------------
    @property
    def _catalog(self) -> Any:
        return routing_catalog(self.router, self._engine)

    def _reserve(self) -> int | None:
        """Output tokens the router's window check keeps free (the fit keeps the same)."""
        if self.fit_context and self.reserve_output is not None:
            return self.reserve_output
        return self.max_tokens

    def _fit(self, name: str, call: RoutedCall) -> None:
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
        result = fit_messages(call.messages, name, reserve_output=reserve,
                              tools=call.tools["tools"] if call.tools else None, catalog=catalog)
        report = result.report
        call.fitted[name] = (FittedPrompt(name, result.messages,
                                          to_openai_messages(result.messages), report)
                             if report.dropped or report.truncated else None)

    def _inner(self, name: str, call: RoutedCall) -> Runnable:
        # bind_tools returns a Runnable, which mypy does not know passes with_structured_output
        # on to the chat model (RunnableBinding delegates attributes): the ignores say so.
        model: Runnable = self.models[name]
        if call.tools is not None:
            model = model.bind_tools(call.tools["tools"], **call.tools["kwargs"])  # type: ignore[attr-defined]
        if call.structured is not None:
            model = model.with_structured_output(  # type: ignore[attr-defined]
                call.structured["schema"], include_raw=True, **call.structured["kwargs"])
        return model

    def _config(self, name: str, call: RoutedCall, reason: str, manager: Any,
                run_id: uuid.UUID) -> RunnableConfig:
        # ls_model_name: the catalog name, for inner models that do not report one (the
        # model's own ls_model_name, when it has one, takes precedence)
        marks = {"route_reason": reason, "attempt": call.attempts, "request_id": call.request_id,
                 "ls_model_name": name}
        if self._engine is not None:
            marks[METERED_MARKER] = True
        # run_id: the inner run is started with the id its usage row already carries
        config: RunnableConfig = {"metadata": marks, "run_id": run_id}
        if manager is not None:
            config["callbacks"] = manager
        return config

    def _admit_kwargs(self, name: str, call: RoutedCall, reason: str,
                      run_id: uuid.UUID) -> dict[str, Any]:
        """The row of one inner call: the invoking run's attribution (see _routed_run),
        this request's id, attempt and route reason, the inner run's id."""
        metadata: dict[str, Any] = {**call.attribution.metadata, "routed": True}
        fitted = call.fitted.get(name)
        if fitted is not None:
            metadata["context_fit"] = fitted.summary
        return dict(call.attribution.row_kwargs(str(run_id)),
                    messages=call.prompt_for(name)[1], max_output_tokens=self.max_tokens,
                    request_id=call.request_id, attempt=call.attempts, route_reason=reason,
                    metadata=metadata)

    # -- one inner call -------------------------------------------------------------------
    def _call_model(self, name: str, call: RoutedCall, reason: str,
                    manager: CallbackManager | None,
                    judge: Callable[[AIMessage], list[str]] | None = None) -> AIMessage:
        engine = self._engine
        self._fit(name, call)
        call.attempts += 1
        call.model = name
        reason = call.explain(name, reason)
        run_id = uuid.uuid4()
        ticket = (engine.admit(name, **self._admit_kwargs(name, call, reason, run_id))
                  if engine else None)
        try:
            with metered_call(ticket is not None):
                output = self._inner(name, call).invoke(
                    call.prompt_for(name)[0],
                    config=self._config(name, call, reason, manager, run_id),
                    stop=call.stop, **call.kwargs)
        except BaseException as exc:
            if ticket is not None:
                engine.release(ticket, error=exc)
            raise
        message = as_message(output)
        self._judge(judge, call, message, ticket)
        settle_completion(engine, ticket, completion_of(message))
        return message

    async def _acall_model(self, name: str, call: RoutedCall, reason: str,
                           manager: AsyncCallbackManager | None,
                           judge: Callable[[AIMessage], list[str]] | None = None) -> AIMessage:
        engine = self._engine
        self._fit(name, call)
        call.attempts += 1
        call.model = name
        reason = call.explain(name, reason)
        run_id = uuid.uuid4()
        ticket = (await engine.aadmit(name, **self._admit_kwargs(name, call, reason, run_id))
                  if engine else None)
        try:
            with metered_call(ticket is not None):
                output = await self._inner(name, call).ainvoke(
                    call.prompt_for(name)[0],
                    config=self._config(name, call, reason, manager, run_id),
                    stop=call.stop, **call.kwargs)
        except BaseException as exc:
            if ticket is not None:
                await engine.arelease(ticket, error=exc)
            raise
        message = as_message(output)
        self._judge(judge, call, message, ticket)
        await asettle_completion(engine, ticket, completion_of(message))
        return message

    def _failures(self, call: RoutedCall, message: AIMessage) -> list[str]:
        if call.structured is not None:
            parsed = message.additional_kwargs.get(PARSED_KEY) or {}
            error = parsed.get("parsing_error")
            return [f"structured output did not parse: {error}"] if error is not None else []
        return self.cascade.evaluate(message_text(message.content),
                                     prompt_text(messages=call.openai_messages))

    def _judge(self, judge: Callable[[AIMessage], list[str]] | None, call: RoutedCall,
               message: AIMessage, ticket: Any) -> None:
        """Run the cascade's checks before the attempt is settled, so the verdict on the
        cheapest answer rides in its usage row (``Router.fit_from_ledger`` learns from it)."""
        if judge is None:
            return
        failures = judge(message)
        if ticket is not None and call.attempts == 1:
            ticket.metadata.update(self.cascade.verdict_metadata(
                prompt_text(messages=call.openai_messages), failures))

    def _judged(self, call: RoutedCall) -> tuple[Callable[[AIMessage], list[str]],
                                                 list[list[str]]]:
        """A judge for one attempt and the list its verdicts land in."""
        verdicts: list[list[str]] = []

        def judge(message: AIMessage) -> list[str]:
            verdicts.append(self._failures(call, message))
            return verdicts[-1]

        return judge, verdicts

    def _with_fallback(self, fn: Callable[[str], Any], name: str) -> Any:
        return fn(name) if self.fallback is None else self.fallback.call(fn, prefer=name)

    async def _awith_fallback(self, fn: Callable[[str], Any], name: str) -> Any:
        if self.fallback is None:
            return await fn(name)
        return await self.fallback.acall(fn, prefer=name)
