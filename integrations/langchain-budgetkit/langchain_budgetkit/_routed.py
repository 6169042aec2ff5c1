"""A drop-in LangChain chat model that routes, cascades and falls back across other models.

    cheap, strong = ChatOpenAI(model="gpt-4o-mini"), ChatOpenAI(model="gpt-4o")
    llm = RoutedChatModel(
        models={"gpt-4o-mini": cheap, "gpt-4o": strong},
        router=budgetkit.Router({"low": "gpt-4o-mini", "high": "gpt-4o"}),
        engine=engine,
    )
    llm.invoke("Summarise this ...")           # the router picks; the row says why

Per call: ``router`` (a :class:`budgetkit.Router`) picks the model, or ``cascade`` (a
:class:`budgetkit.Cascade`) tries its models cheapest first until an answer passes its
checks, or, with neither, ``default_model`` (the first model) answers. ``fallback`` (a
:class:`budgetkit.Fallback`) wraps every model call: transient errors are retried, then
the next model is tried; a :class:`budgetkit.BudgetExceeded` is never retried nor sent
to another model. (LangChain's own ``with_fallbacks`` / ``with_retry`` catch every
``Exception`` by default: if you wrap this model in them, pass
``exceptions_to_handle`` / ``retry_if_exception_type`` that leave ``BudgetExceeded``
out.) Per-call keyword arguments ``model=`` (a required model), ``task_type=`` and
``low_latency=`` steer the router; ``task_type``, ``user_id`` and
``project`` are also read from the run's ``metadata``.

The inner models run as child runs of this one (their callbacks fire with this run as
parent), so tracers and budgetkit's handler see the real model calls. With an ``engine``,
this model admits and settles every inner call itself (one usage row per call, with the
request id, the attempt number and the route reason), so a budget stops a call before the
provider runs. Double counting is avoided by markers (see ``ROUTED_MARKER`` and
``METERED_MARKER``): this model's own run carries ``ROUTED_MARKER`` in its metadata and its
answer's ``response_metadata``, and inner runs already metered carry ``METERED_MARKER`` in
their metadata (and run while ``budgetkit._cascade.is_metered_call()`` is true); a tracking
handler records neither. Without an engine the inner runs are
left to the handler, with ``route_reason`` / ``attempt`` / ``request_id`` in their metadata.

``bind_tools`` and ``with_structured_output`` pass through to whichever model is chosen:
the tools (or schema) are bound to it at call time. In a cascade with structured output an
answer is accepted when it parses; text checks are not applied to tool calls.

Context fit (``fit_context=True``; off by default). The router still comes first: it sends
a long prompt to the cheapest model whose window takes it. Only when no routed model's
window takes the prompt (or a required model is too small) does ``fit_context`` change the
route: instead of raising :class:`budgetkit.ContextWindowExceeded`, the call goes to the
routed model with the largest window (or the required one). Before *any* inner call
(routed, cascade attempt, fallback target or default model) a prompt that overflows that
model's window is fitted with :func:`langchain_budgetkit.fit_messages`: system messages and
the newest turns kept, a tool call kept with its results, the newest user message cut in
the middle only when it alone is too long. Counting is exact (the model's tokenizer, bound
tools included); ``reserve_output`` (default ``max_tokens``, else the router's
``default_max_output_tokens``) stays free for the reply. A fit is explained in the route
reason ("context fit: 9000 -> 7100 tokens for gpt-4 (limit 7168), 12 messages dropped"),
in the usage row's ``metadata["context_fit"]`` and in the answer's marker (``context_fit``:
model, tokens_before, tokens_after, limit, dropped, truncated). A prompt that cannot be
fitted (system messages alone too long) still raises ``ContextWindowExceeded``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import (AsyncCallbackManager, AsyncCallbackManagerForLLMRun,
                                      CallbackManager, CallbackManagerForLLMRun)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.outputs.chat_generation import merge_chat_generation_chunks
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, ensure_config
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from budgetkit import ConfigurationError, ContextWindowExceeded, FitReport
from budgetkit._cascade import Completion, asettle_completion, metered_call, settle_completion
from budgetkit._router import RouteDecision
from budgetkit._routed import (check_routed_models, explain_fit, fallback_reason,
                               fit_summary, largest_window_decision, routing_catalog)

from ._usage_parse import usage_from_metadata
from ._fitting import fit_messages
from ._messages import message_text, to_openai_messages

__all__ = ["RoutedChatModel", "ROUTED_MARKER", "METERED_MARKER"]

#: In this model's run metadata and in its answers' ``response_metadata``: the run is a
#: wrapper whose cost is recorded on its inner runs (a tracker must not count it).
ROUTED_MARKER = "budgetkit_routed"
#: In an inner run's metadata: the routed model's engine has already recorded this call.
METERED_MARKER = "budgetkit_metered"

_TOOLS_KEY = "budgetkit_tools"            # bound by bind_tools, applied to the chosen model
_STRUCTURED_KEY = "budgetkit_structured"  # bound by with_structured_output
_PARSED_KEY = "budgetkit_parsed"          # where the chosen model's parsed output travels
_ROUTING_KWARGS = ("model", "required_model", "task_type", "low_latency")


@dataclass
class _Fitted:
    """The prompt one model receives after ``fit_context`` cut it to its window."""

    model: str
    messages: list[BaseMessage]
    openai_messages: list[dict[str, Any]]
    report: FitReport

    @property
    def summary(self) -> dict[str, Any]:
        """What the usage row and the answer's marker record about the fit."""
        return fit_summary(self.model, self.report)

    def explain(self, reason: str) -> str:
        return explain_fit(reason, self.model, self.report)


@dataclass
class _Call:
    """One request: its routing inputs and its attempt counter."""

    messages: list[BaseMessage]
    openai_messages: list[dict[str, Any]]
    stop: list[str] | None
    kwargs: dict[str, Any]
    request_id: str
    attribution: dict[str, Any]
    required_model: str | None
    task_type: str | None
    low_latency: bool
    tools: dict[str, Any] | None
    structured: dict[str, Any] | None
    attempts: int = 0
    parent_run_id: str | None = None
    model: str | None = None  # the model of the latest attempt
    # fit_context: model -> its fitted prompt (None: the whole prompt fits that model)
    fitted: dict[str, _Fitted | None] = field(default_factory=dict)

    def prompt_for(self, model: str) -> tuple[list[BaseMessage], list[dict[str, Any]]]:
        """The messages ``model`` is sent (LangChain and OpenAI form)."""
        fitted = self.fitted.get(model)
        if fitted is None:
            return self.messages, self.openai_messages
        return fitted.messages, fitted.openai_messages

    def explain(self, model: str | None, reason: str) -> str:
        """``reason`` plus what fitting the prompt to ``model`` did, if anything."""
        fitted = self.fitted.get(model) if model else None
        return reason if fitted is None else fitted.explain(reason)


class RoutedChatModel(BaseChatModel):
    """A chat model that sends each call to one of several chat models (see module doc).

    With ``fit_context=True`` a prompt too long for the model a call goes to is fitted to
    its window (system messages and newest turns kept) instead of failing; the router's
    escalation to a larger-window model comes first. Off by default.
    """

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

    # -- identity ---------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "budgetkit-routed"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"models": list(self.models), "router": type(self.router).__name__,
                "cascade": type(self.cascade).__name__, "default_model": self.default_model}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        model = kwargs.get("model")
        params: dict[str, Any] = {
            "ls_provider": "budgetkit", "ls_model_type": "chat",
            # not a catalog name on purpose: a tracker must not price the wrapper itself
            "ls_model_name": model if isinstance(model, str) else "budgetkit-routed",
            ROUTED_MARKER: True,
        }
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if isinstance(max_tokens, int):
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    @property
    def _engine(self) -> Any:
        return (self.engine or getattr(self.cascade, "engine", None)
                or getattr(self.router, "engine", None))

    # -- tools and structured output pass through --------------------------------------
    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind ``tools`` to whichever model each call is routed to."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(**{_TOOLS_KEY: {"tools": formatted, "kwargs": kwargs}})

    def with_structured_output(self, schema: Any, *, include_raw: bool = False,
                               **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        """The chosen model's own ``with_structured_output(schema, **kwargs)`` per call."""
        spec = {"schema": schema, "kwargs": kwargs}

        def unwrap(message: AIMessage) -> Any:
            result = message.additional_kwargs.get(_PARSED_KEY) or {}
            if include_raw:
                raw = message.model_copy(update={"additional_kwargs": {
                    k: v for k, v in message.additional_kwargs.items() if k != _PARSED_KEY}})
                return {"raw": raw, "parsed": result.get("parsed"),
                        "parsing_error": result.get("parsing_error")}
            if result.get("parsing_error") is not None:
                raise result["parsing_error"]
            return result.get("parsed")

        return self.bind(**{_STRUCTURED_KEY: spec}) | RunnableLambda(unwrap)

    # -- planning -----------------------------------------------------------------------------
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None,
                 run_manager: Any, kwargs: dict[str, Any]) -> _Call:
        kwargs = dict(kwargs)
        required = kwargs.pop("model", None) or kwargs.pop("required_model", None)
        kwargs.pop("required_model", None)
        metadata = {**(getattr(run_manager, "inheritable_metadata", None) or {}),
                    **(getattr(run_manager, "metadata", None) or {})}
        task_type = kwargs.pop("task_type", None) or metadata.get("task_type") or self.task_type
        low_latency = bool(kwargs.pop("low_latency", self.low_latency))
        attribution = {key: metadata[key] for key in ("user_id", "session_id", "project")
                       if isinstance(metadata.get(key), str)}
        if task_type:
            attribution["task_type"] = task_type
        request_id = str(metadata.get("request_id") or uuid.uuid4().hex)
        tools = kwargs.pop(_TOOLS_KEY, None)
        structured = kwargs.pop(_STRUCTURED_KEY, None)
        return _Call(messages=messages, openai_messages=to_openai_messages(messages),
                     stop=stop or self.stop, kwargs=kwargs, request_id=request_id,
                     attribution=attribution, required_model=required, task_type=task_type,
                     low_latency=low_latency, tools=tools, structured=structured,
                     parent_run_id=str(run_manager.run_id) if run_manager else None)

    def _decide(self, call: _Call, run_manager: Any) -> RouteDecision:
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
                    user_id=call.attribution.get("user_id"),
                    project=call.attribution.get("project"),
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
        result = fit_messages(call.messages, name, reserve_output=reserve,
                              tools=call.tools["tools"] if call.tools else None, catalog=catalog)
        report = result.report
        call.fitted[name] = (_Fitted(name, result.messages, to_openai_messages(result.messages),
                                     report) if report.dropped or report.truncated else None)

    def _inner(self, name: str, call: _Call) -> Runnable:
        model: Runnable = self.models[name]
        if call.tools is not None:
            model = model.bind_tools(call.tools["tools"], **call.tools["kwargs"])  # type: ignore[attr-defined]
        if call.structured is not None:
            model = model.with_structured_output(  # type: ignore[attr-defined]
                call.structured["schema"], include_raw=True, **call.structured["kwargs"])
        return model

    def _config(self, name: str, call: _Call, reason: str, manager: Any) -> RunnableConfig:
        # ls_model_name: the catalog name, for inner models that do not report one (the
        # model's own ls_model_name, when it has one, takes precedence)
        marks = {"route_reason": reason, "attempt": call.attempts, "request_id": call.request_id,
                 "ls_model_name": name}
        if self._engine is not None:
            marks[METERED_MARKER] = True
        config: RunnableConfig = {"metadata": marks}
        if manager is not None:
            config["callbacks"] = manager
        return config

    def _admit_kwargs(self, name: str, call: _Call, reason: str) -> dict[str, Any]:
        metadata: dict[str, Any] = {"routed": True}
        fitted = call.fitted.get(name)
        if fitted is not None:
            metadata["context_fit"] = fitted.summary
        return dict(call.attribution, messages=call.prompt_for(name)[1],
                    max_output_tokens=self.max_tokens, request_id=call.request_id,
                    attempt=call.attempts, route_reason=reason,
                    parent_run_id=call.parent_run_id, metadata=metadata)

    # -- one inner call -------------------------------------------------------------------
    def _call_model(self, name: str, call: _Call, reason: str,
                    manager: CallbackManager | None) -> AIMessage:
        engine = self._engine
        self._fit(name, call)
        call.attempts += 1
        call.model = name
        reason = call.explain(name, reason)
        ticket = engine.admit(name, **self._admit_kwargs(name, call, reason)) if engine else None
        try:
            with metered_call(ticket is not None):
                output = self._inner(name, call).invoke(
                    call.prompt_for(name)[0], config=self._config(name, call, reason, manager),
                    stop=call.stop, **call.kwargs)
        except BaseException as exc:
            if ticket is not None:
                engine.release(ticket, error=exc)
            raise
        message = _as_message(output)
        settle_completion(engine, ticket, _completion(message))
        return message

    async def _acall_model(self, name: str, call: _Call, reason: str,
                           manager: AsyncCallbackManager | None) -> AIMessage:
        engine = self._engine
        self._fit(name, call)
        call.attempts += 1
        call.model = name
        reason = call.explain(name, reason)
        ticket = (await engine.aadmit(name, **self._admit_kwargs(name, call, reason))
                  if engine else None)
        try:
            with metered_call(ticket is not None):
                output = await self._inner(name, call).ainvoke(
                    call.prompt_for(name)[0], config=self._config(name, call, reason, manager),
                    stop=call.stop, **call.kwargs)
        except BaseException as exc:
            if ticket is not None:
                await engine.arelease(ticket, error=exc)
            raise
        message = _as_message(output)
        await asettle_completion(engine, ticket, _completion(message))
        return message

    def _failures(self, call: _Call, message: AIMessage) -> list[str]:
        if call.structured is not None:
            parsed = message.additional_kwargs.get(_PARSED_KEY) or {}
            error = parsed.get("parsing_error")
            return [f"structured output did not parse: {error}"] if error is not None else []
        return self.cascade.evaluate(message_text(message.content))

    # -- generate -------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        call = self._prepare(messages, stop, run_manager, kwargs)
        manager = _child_manager(run_manager)
        if self.cascade is None:
            decision = self._decide(call, run_manager)
            message = self._with_fallback(
                lambda name: self._call_model(name, call, fallback_reason(decision, name),
                                              manager),
                decision.model)
            return _result(message, call, decision.reason)
        reason, message, previous = "", None, None
        for number, name in enumerate(self.cascade.models, start=1):
            reason = self.cascade.attempt_reason(number, previous)
            message = self._with_fallback(
                lambda model, reason=reason: self._call_model(model, call, reason, manager), name)
            previous = _Failed(name, self._failures(call, message))
            if not previous.failures:
                break
        assert message is not None
        return _result(message, call, reason)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        call = self._prepare(messages, stop, run_manager, kwargs)
        manager = _child_manager(run_manager)
        if self.cascade is None:
            decision = self._decide(call, run_manager)
            message = await self._awith_fallback(
                lambda name: self._acall_model(name, call, fallback_reason(decision, name),
                                               manager),
                decision.model)
            return _result(message, call, decision.reason)
        reason, message, previous = "", None, None
        for number, name in enumerate(self.cascade.models, start=1):
            reason = self.cascade.attempt_reason(number, previous)
            message = await self._awith_fallback(
                lambda model, reason=reason: self._acall_model(model, call, reason, manager),
                name)
            previous = _Failed(name, self._failures(call, message))
            if not previous.failures:
                break
        assert message is not None
        return _result(message, call, reason)

    def _with_fallback(self, fn: Callable[[str], Any], name: str) -> Any:
        return fn(name) if self.fallback is None else self.fallback.call(fn, prefer=name)

    async def _awith_fallback(self, fn: Callable[[str], Any], name: str) -> Any:
        if self.fallback is None:
            return await fn(name)
        return await self.fallback.acall(fn, prefer=name)

    # -- stream ---------------------------------------------------------------------------
    # BaseChatModel.stream() / astream() call _stream / _astream *without* the run manager,
    # so inner streams could not be child runs (their callbacks would be lost). These two
    # open the run the way BaseChatModel does and hand the run manager down.
    def _open_run(self, input: LanguageModelInput, config: RunnableConfig | None,
                  stop: list[str] | None, kwargs: dict[str, Any],
                  manager_cls: Any) -> tuple[Any, list[BaseMessage], dict[str, Any]]:
        config = ensure_config(config)
        messages = self._convert_input(input).to_messages()
        params = self._get_invocation_params(stop=stop, **kwargs)
        ls_params = getattr(self, "_get_ls_params_with_defaults", self._get_ls_params)
        manager = manager_cls.configure(
            config.get("callbacks"), self.callbacks, self.verbose, config.get("tags"),
            self.tags, {**(config.get("metadata") or {}), **ls_params(stop=stop, **kwargs)},
            self.metadata)
        start = {"invocation_params": params,
                 "options": {"stop": stop, **{k: params[k] for k in kwargs if k in params}},
                 "name": config.get("run_name"), "run_id": config.pop("run_id", None),
                 "batch_size": 1}
        return manager, messages, start

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        manager, messages, start = self._open_run(input, config, stop, kwargs, CallbackManager)
        (run_manager,) = manager.on_chat_model_start(self._serialized, [messages], **start)
        chunks: list[ChatGenerationChunk] = []
        try:
            for chunk in self._stream(messages, stop=stop, run_manager=run_manager, **kwargs):
                chunks.append(chunk)
                yield chunk.message  # type: ignore[misc]
        except BaseException as exc:
            merged = merge_chat_generation_chunks(chunks)
            run_manager.on_llm_error(exc, response=LLMResult(
                generations=[[merged]] if merged else []))
            raise
        run_manager.on_llm_end(_final(chunks))

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None,
                      *, stop: list[str] | None = None,
                      **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        manager, messages, start = self._open_run(input, config, stop, kwargs,
                                                  AsyncCallbackManager)
        (run_manager,) = await manager.on_chat_model_start(self._serialized, [messages],
                                                           **start)
        chunks: list[ChatGenerationChunk] = []
        try:
            async for chunk in self._astream(messages, stop=stop, run_manager=run_manager,
                                             **kwargs):
                chunks.append(chunk)
                yield chunk.message  # type: ignore[misc]
        except BaseException as exc:
            merged = merge_chat_generation_chunks(chunks)
            await run_manager.on_llm_error(exc, response=LLMResult(
                generations=[[merged]] if merged else []))
            raise
        await run_manager.on_llm_end(_final(chunks))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, run_manager, kwargs)
        manager = _child_manager(run_manager)
        name, reason = self._stream_target(call, run_manager, manager)
        if name is None:  # the cascade accepted a buffered answer
            chunk = _chunk_of(reason[1], call, reason[0])
            _emit(run_manager, chunk)
            yield chunk
            return

        def opener(model: str) -> tuple[str, _Stream]:
            stream = _Stream(self, model, call, reason, manager)
            stream.open()  # the first chunk is pulled here, inside the fallback's try
            return model, stream

        _, stream = self._with_fallback(opener, name)
        for index, piece in enumerate(stream):
            chunk = _chunk_of(piece, call, reason, first=index == 0)
            _emit(run_manager, chunk)
            yield chunk

    def _stream_target(self, call: _Call, run_manager: Any, manager: Any) -> tuple[Any, Any]:
        """(model to stream, reason); a cascade buffers every attempt but the last."""
        if self.cascade is None:
            decision = self._decide(call, run_manager)
            return decision.model, fallback_reason(decision, decision.model)
        previous = None
        models = self.cascade.models
        for number, name in enumerate(models, start=1):
            reason = self.cascade.attempt_reason(number, previous)
            if number == len(models):
                return name, reason
            message = self._with_fallback(
                lambda model, reason=reason: self._call_model(model, call, reason, manager), name)
            previous = _Failed(name, self._failures(call, message))
            if not previous.failures:
                return None, (reason, _as_chunk(message))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, run_manager, kwargs)
        manager = _child_manager(run_manager)
        name, reason = await self._astream_target(call, run_manager, manager)
        if name is None:
            chunk = _chunk_of(reason[1], call, reason[0])
            await _aemit(run_manager, chunk)
            yield chunk
            return

        async def opener(model: str) -> tuple[str, _AsyncStream]:
            stream = _AsyncStream(self, model, call, reason, manager)
            await stream.open()
            return model, stream

        _, stream = await self._awith_fallback(opener, name)
        index = 0
        async for piece in stream:
            chunk = _chunk_of(piece, call, reason, first=index == 0)
            index += 1
            await _aemit(run_manager, chunk)
            yield chunk

    async def _astream_target(self, call: _Call, run_manager: Any,
                              manager: Any) -> tuple[Any, Any]:
        if self.cascade is None:
            decision = self._decide(call, run_manager)
            return decision.model, fallback_reason(decision, decision.model)
        previous = None
        models = self.cascade.models
        for number, name in enumerate(models, start=1):
            reason = self.cascade.attempt_reason(number, previous)
            if number == len(models):
                return name, reason
            message = await self._awith_fallback(
                lambda model, reason=reason: self._acall_model(model, call, reason, manager),
                name)
            previous = _Failed(name, self._failures(call, message))
            if not previous.failures:
                return None, (reason, _as_chunk(message))
        raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------- streaming

class _Stream:
    """One inner model's stream, admitted and settled like a single call."""

    def __init__(self, owner: RoutedChatModel, name: str, call: _Call, reason: str,
                 manager: Any) -> None:
        self.owner, self.name, self.call, self.reason, self.manager = (
            owner, name, call, reason, manager)
        self.engine = owner._engine
        self.ticket: Any = None
        self.first: AIMessageChunk | None = None
        self.total: AIMessageChunk | None = None

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
                self.name, **self.owner._admit_kwargs(self.name, call, self.reason))
        try:
            config = self.owner._config(self.name, call, self.reason, self.manager)
            self.iterator = iter(self.owner._inner(self.name, call).stream(
                call.prompt_for(self.name)[0], config=config, stop=call.stop, **call.kwargs))
            self.first = _as_chunk(self._next(AIMessageChunk(content="")))
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
            yield self.first
            while (piece := self._next()) is not None:
                chunk = _as_chunk(piece)
                self.total = self.total + chunk
                yield chunk
        except BaseException as exc:
            self._release(exc)
            raise
        settle_completion(self.engine, self.ticket, _completion(self.total))

    def _release(self, exc: BaseException) -> None:
        if self.ticket is not None:
            self.engine.release(self.ticket, error=exc)


class _AsyncStream(_Stream):
    async def open(self) -> None:  # type: ignore[override]
        call = self.call
        self._start()
        if self.engine is not None:
            self.ticket = await self.engine.aadmit(
                self.name, **self.owner._admit_kwargs(self.name, call, self.reason))
        try:
            config = self.owner._config(self.name, call, self.reason, self.manager)
            self.aiterator = self.owner._inner(self.name, call).astream(
                call.prompt_for(self.name)[0], config=config, stop=call.stop,
                **call.kwargs).__aiter__()
            self.first = _as_chunk(await self._anext() or AIMessageChunk(content=""))
        except BaseException as exc:
            self._release(exc)
            raise

    async def _anext(self) -> Any:
        with metered_call(self.ticket is not None):
            try:
                return await self.aiterator.__anext__()
            except StopAsyncIteration:
                return None

    async def __aiter__(self) -> AsyncIterator[AIMessageChunk]:  # type: ignore[override]
        assert self.first is not None
        self.total = self.first
        try:
            yield self.first
            while (piece := await self._anext()) is not None:
                chunk = _as_chunk(piece)
                self.total = self.total + chunk
                yield chunk
        except BaseException as exc:
            self._release(exc)
            raise
        await asettle_completion(self.engine, self.ticket, _completion(self.total))


# ---------------------------------------------------------------------------- helpers

@dataclass
class _Failed:
    model: str
    failures: list[str]


def _child_manager(run_manager: Any) -> Any:
    """Callbacks for inner calls: this run's inheritable handlers, this run as parent.

    LLM run managers have no ``get_child()``; this mirrors what chains do. The wrapper's
    marker is dropped so trackers do record the inner runs.
    """
    if run_manager is None:
        return None
    cls = AsyncCallbackManager if isinstance(run_manager, AsyncCallbackManagerForLLMRun) \
        else CallbackManager
    manager = cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(run_manager.inheritable_handlers)
    manager.add_tags(run_manager.inheritable_tags)
    manager.add_metadata({key: value for key, value in run_manager.inheritable_metadata.items()
                          if key != ROUTED_MARKER and not key.startswith("ls_")})
    return manager


def _as_message(output: Any) -> AIMessage:
    """An inner result as a message (structured output's parsed value rides along)."""
    if isinstance(output, dict) and "raw" in output and "parsed" in output:
        raw = output["raw"]
        extra = dict(raw.additional_kwargs)
        extra[_PARSED_KEY] = {"parsed": output["parsed"],
                              "parsing_error": output.get("parsing_error")}
        return raw.model_copy(update={"additional_kwargs": extra})
    if isinstance(output, BaseMessage):
        return output if isinstance(output, AIMessage) else AIMessage(
            content=output.content, additional_kwargs=output.additional_kwargs,
            response_metadata=output.response_metadata)
    raise ConfigurationError(f"a routed model returned {type(output).__name__}, not a message")


def _as_chunk(output: Any) -> AIMessageChunk:
    if isinstance(output, AIMessageChunk):
        return output
    message = _as_message(output)
    return AIMessageChunk(content=message.content, additional_kwargs=message.additional_kwargs,
                          response_metadata=message.response_metadata,
                          tool_calls=message.tool_calls, usage_metadata=message.usage_metadata,
                          id=message.id)


def _completion(message: BaseMessage) -> Completion:
    usage = usage_from_metadata(getattr(message, "usage_metadata", None))
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


def _marker(call: _Call, reason: str) -> dict[str, Any]:
    marker = {"model": call.model, "route_reason": call.explain(call.model, reason),
              "attempts": call.attempts, "request_id": call.request_id}
    fitted = call.fitted.get(call.model) if call.model else None
    if fitted is not None:
        marker["context_fit"] = fitted.summary
    return marker


def _result(message: AIMessage, call: _Call, reason: str) -> ChatResult:
    metadata = dict(message.response_metadata)
    metadata[ROUTED_MARKER] = _marker(call, reason)
    message = message.model_copy(update={"response_metadata": metadata})
    return ChatResult(generations=[ChatGeneration(message=message)])


def _chunk_of(piece: AIMessageChunk, call: _Call, reason: str, *,
              first: bool = True) -> ChatGenerationChunk:
    if first:
        metadata = dict(piece.response_metadata)
        metadata[ROUTED_MARKER] = _marker(call, reason)
        piece = piece.model_copy(update={"response_metadata": metadata})
    return ChatGenerationChunk(message=piece)


def _final(chunks: list[ChatGenerationChunk]) -> LLMResult:
    merged = merge_chat_generation_chunks(chunks)
    return LLMResult(generations=[[merged]] if merged is not None else [[]])


def _emit(run_manager: Any, chunk: ChatGenerationChunk) -> None:
    if run_manager is not None:
        run_manager.on_llm_new_token(message_text(chunk.message.content), chunk=chunk)


async def _aemit(run_manager: Any, chunk: ChatGenerationChunk) -> None:
    if run_manager is not None:
        await run_manager.on_llm_new_token(message_text(chunk.message.content), chunk=chunk)
