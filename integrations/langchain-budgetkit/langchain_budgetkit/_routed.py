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
provider runs. Those rows carry what the tracking handler would have given them: the
invoking run's ``metadata`` (``operation_type``, ``user_id``, ``session_id``, ``project``,
``task_type``, ``request_id``, the rest kept as row metadata), its tags, a budgetkit
handler's defaults, and run ids (the inner run's own, this run as parent, the chain's root;
see ``_routed_run``). Double counting is avoided by markers (see ``ROUTED_MARKER`` and
``METERED_MARKER``): this model's own run carries ``ROUTED_MARKER`` in its metadata and its
answer's ``response_metadata``, and inner runs already metered carry ``METERED_MARKER`` in
their metadata (and run while ``budgetkit.routing._cascade.is_metered_call()`` is true); a tracking
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

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from langchain_core.callbacks import (AsyncCallbackManager, AsyncCallbackManagerForLLMRun,
                                      CallbackManager, CallbackManagerForLLMRun)
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.outputs.chat_generation import merge_chat_generation_chunks
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, ensure_config
from langchain_core.utils.function_calling import convert_to_openai_tool

from budgetkit.routing import fallback_reason

from ._routed_calls import _STRUCTURED_KEY, _TOOLS_KEY, _RoutedCalls
from ._routed_run import METERED_MARKER, PARSED_KEY, ROUTED_MARKER, RoutedCall
from ._routed_stream import (AsyncInnerStream, InnerStream, aemit_chunk, as_chunk, emit_chunk,
                             final_result, routed_chunk, routed_result)

__all__ = ["RoutedChatModel", "ROUTED_MARKER", "METERED_MARKER"]


class RoutedChatModel(_RoutedCalls):
    """A chat model that sends each call to one of several chat models (see module doc).

    With ``fit_context=True`` a prompt too long for the model a call goes to is fitted to
    its window (system messages and newest turns kept) instead of failing; the router's
    escalation to a larger-window model comes first. Off by default.
    """

    # Settings, route decision, context fit and one inner call: see _RoutedCalls.
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
            result = message.additional_kwargs.get(PARSED_KEY) or {}
            if include_raw:
                raw = message.model_copy(update={"additional_kwargs": {
                    k: v for k, v in message.additional_kwargs.items() if k != PARSED_KEY}})
                return {"raw": raw, "parsed": result.get("parsed"),
                        "parsing_error": result.get("parsing_error")}
            if result.get("parsing_error") is not None:
                raise result["parsing_error"]
            return result.get("parsed")

        return self.bind(**{_STRUCTURED_KEY: spec}) | RunnableLambda(unwrap)

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
            return routed_result(message, call, decision.reason)
        reason, message, previous = "", None, None
        for number, name in enumerate(self.cascade.models, start=1):
            reason = self.cascade.attempt_reason(number, previous)
            judge, verdicts = self._judged(call)
            message = self._with_fallback(
                partial(self._call_model, call=call, reason=reason, manager=manager,
                        judge=judge), name)
            previous = _Failed(name, verdicts[-1])
            if not previous.failures:
                break
        assert message is not None
        return routed_result(message, call, reason)

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
            return routed_result(message, call, decision.reason)
        reason, message, previous = "", None, None
        for number, name in enumerate(self.cascade.models, start=1):
            reason = self.cascade.attempt_reason(number, previous)
            judge, verdicts = self._judged(call)
            message = await self._awith_fallback(
                partial(self._acall_model, call=call, reason=reason, manager=manager,
                        judge=judge), name)
            previous = _Failed(name, verdicts[-1])
            if not previous.failures:
                break
        assert message is not None
        return routed_result(message, call, reason)

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
                yield chunk.message  # type: ignore[misc]  # a chat model's chunks are AI chunks
        except BaseException as exc:
            merged = merge_chat_generation_chunks(chunks)
            run_manager.on_llm_error(exc, response=LLMResult(
                generations=[[merged]] if merged else []))
            raise
        run_manager.on_llm_end(final_result(chunks))

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
                yield chunk.message  # type: ignore[misc]  # a chat model's chunks are AI chunks
        except BaseException as exc:
            merged = merge_chat_generation_chunks(chunks)
            await run_manager.on_llm_error(exc, response=LLMResult(
                generations=[[merged]] if merged else []))
            raise
        await run_manager.on_llm_end(final_result(chunks))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, run_manager, kwargs)
        manager = _child_manager(run_manager)
        name, reason = self._stream_target(call, run_manager, manager)
        if name is None:  # the cascade accepted a buffered answer
            chunk = routed_chunk(reason[1], call, reason[0])
            emit_chunk(run_manager, chunk)
            yield chunk
            return

        def opener(model: str) -> tuple[str, InnerStream]:
            stream = InnerStream(self, model, call, reason, manager)
            stream.open()  # the first chunk is pulled here, inside the fallback's try
            return model, stream

        _, stream = self._with_fallback(opener, name)
        for index, piece in enumerate(stream):
            chunk = routed_chunk(piece, call, reason, first=index == 0)
            emit_chunk(run_manager, chunk)
            yield chunk

    def _stream_target(self, call: RoutedCall, run_manager: Any, manager: Any) -> tuple[Any, Any]:
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
            judge, verdicts = self._judged(call)
            message = self._with_fallback(
                partial(self._call_model, call=call, reason=reason, manager=manager,
                        judge=judge), name)
            previous = _Failed(name, verdicts[-1])
            if not previous.failures:
                return None, (reason, as_chunk(message))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, run_manager, kwargs)
        manager = _child_manager(run_manager)
        name, reason = await self._astream_target(call, run_manager, manager)
        if name is None:
            chunk = routed_chunk(reason[1], call, reason[0])
            await aemit_chunk(run_manager, chunk)
            yield chunk
            return

        async def opener(model: str) -> tuple[str, AsyncInnerStream]:
            stream = AsyncInnerStream(self, model, call, reason, manager)
            await stream.open()
            return model, stream

        _, stream = await self._awith_fallback(opener, name)
        index = 0
        async for piece in stream:
            chunk = routed_chunk(piece, call, reason, first=index == 0)
            index += 1
            await aemit_chunk(run_manager, chunk)
            yield chunk

    async def _astream_target(self, call: RoutedCall, run_manager: Any,
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
            judge, verdicts = self._judged(call)
            message = await self._awith_fallback(
                partial(self._acall_model, call=call, reason=reason, manager=manager,
                        judge=judge), name)
            previous = _Failed(name, verdicts[-1])
            if not previous.failures:
                return None, (reason, as_chunk(message))
        raise AssertionError("unreachable")  # pragma: no cover


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
