"""A LlamaIndex LLM that answers repeated (or reworded) prompts from budgetkit's cache.

    from llama_index.llms.budgetkit import CachedLLM

    llm = CachedLLM(llm=OpenAI(model="gpt-4o-mini"), engine=engine, namespace="tenant-42",
                    semantic=True, embed_model=my_llama_index_embedding)

Wraps any LlamaIndex ``LLM`` (also a :class:`RoutedLLM`). A miss calls the inner LLM,
which emits its own instrumentation events and callbacks, so tracking handlers record the
real call once; its answer is then cached with what it cost. A hit never reaches the
inner LLM (no events fire) and is written to the ledger by the cache as a ``cached`` row
with zero cost and the original cost saved. Served responses carry
``additional_kwargs["budgetkit_cache_hit"] = True`` (plus ``"budgetkit_cache"``:
``"exact"`` / ``"semantic"``, ``"budgetkit_similarity"``, ``"budgetkit_saved_nanos"``).

The key holds the namespace, the inner LLM's class and model name, its configuration
(temperature, max tokens ...) and the call's keyword arguments, then the prompt or the
messages. A stream is served as one chunk on a hit; on a miss it streams through and
caches the finished answer.

The user of a call is the ``user_id`` of the innermost ``attribution(...)`` block
(``llama_index.callbacks.budgetkit``), else the ``user_id`` field: a question about the
asker ("where is my order?") is stored and served for that user only (the cache's
``scope``), and a hit's ledger row is theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen,
                                              ChatResponseGen, CompletionResponse,
                                              CompletionResponseAsyncGen, CompletionResponseGen,
                                              LLMMetadata, MessageRole)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.llm import LLM

from budgetkit import ConfigurationError
from budgetkit.cache import CacheHit, ResponseCache
from llama_index.callbacks.budgetkit import current_attribution
from llama_index.callbacks.budgetkit.messages import (response_model, to_openai_messages,
                                                      usage_from_raw)

__all__ = ["CachedLLM", "CACHE_HIT_MARK"]

CACHE_HIT_MARK = "budgetkit_cache_hit"
_SECRET_HINTS = ("key", "token", "secret", "password", "header")


def _config_of(llm: Any) -> dict[str, Any]:
    """The inner LLM's plain settings (secrets and objects left out); only ever hashed."""
    try:
        settings = llm.to_dict()
    except Exception:  # noqa: BLE001  # cannot describe itself: key on class + model only
        return {}
    return {name: value for name, value in settings.items()
            if isinstance(value, (str, int, float, bool, type(None), list, dict))
            and not any(hint in name.lower() for hint in _SECRET_HINTS)}


def _marks(hit: CacheHit) -> dict[str, Any]:
    return {CACHE_HIT_MARK: True, "budgetkit_cache": hit.kind,
            "budgetkit_similarity": round(hit.similarity, 4),
            "budgetkit_saved_nanos": hit.saved_nanos}


class CachedLLM(LLM):
    """Any LlamaIndex LLM with budgetkit's exact + semantic response cache in front."""

    llm: Any = Field(description="The LlamaIndex LLM that answers misses.")
    engine: Any = Field(default=None, exclude=True)
    cache: Any = Field(default=None, exclude=True,
                       description="A ResponseCache to share (default: a new one).")
    namespace: str = "default"
    task_type: str | None = None
    semantic: bool | None = None
    embed_model: Any = Field(default=None, exclude=True)
    threshold: float | None = None
    user_id: str | None = Field(
        default=None, description="The user of calls made outside an attribution block.")
    _cache: ResponseCache = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(self.llm, LLM):
            raise ConfigurationError(
                f"CachedLLM needs llm= a LlamaIndex LLM, got {type(self.llm).__name__}")
        if self.cache is not None:
            self._cache = self.cache
        elif self.engine is not None:
            options: dict[str, Any] = {
                "semantic": self.embed_model is not None if self.semantic is None
                else self.semantic,
                "embedder": self.embed_model, "namespace": self.namespace}
            if self.threshold is not None:
                options["threshold"] = self.threshold
            self._cache = ResponseCache(self.engine, **options)
        else:
            raise ConfigurationError("CachedLLM needs engine= or cache=")

    @classmethod
    def class_name(cls) -> str:
        return "CachedLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return self.llm.metadata

    @property
    def response_cache(self) -> ResponseCache:
        return self._cache

    # -- keys ---------------------------------------------------------------------------
    def _request(self, kwargs: dict[str, Any], *, prompt: str | None = None,
                 messages: Sequence[ChatMessage] | None = None) -> dict[str, Any]:
        model_name = getattr(self.metadata, "model_name", None) or "unknown"
        request: dict[str, Any] = {
            "model": f"{self.llm.class_name()}:{model_name}", "namespace": self.namespace,
            "task_type": kwargs.get("task_type", self.task_type),
            "params": {"llm": _config_of(self.llm),
                       **{k: v for k, v in kwargs.items() if k != "task_type"}},
            "user_id": current_attribution().get("user_id") or self.user_id}
        if messages is not None:
            request["messages"] = to_openai_messages(messages)
        else:
            request["prompt"] = prompt
        return request

    def _inner_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in kwargs.items() if k != "task_type"}

    def _store(self, request: dict[str, Any], response: Any, value: dict[str, Any]) -> None:
        usage = usage_from_raw(getattr(response, "raw", None),
                               getattr(response, "additional_kwargs", None))
        price_model = (response_model(getattr(response, "raw", None))
                       or getattr(self.metadata, "model_name", None))
        self._cache.store(value, price_model=price_model,
                          input_tokens=usage.input_tokens if usage else None,
                          output_tokens=usage.output_tokens if usage else None, **request)

    @staticmethod
    def _chat_value(response: ChatResponse) -> dict[str, Any]:
        message = response.message
        return {"role": getattr(message.role, "value", message.role),
                "content": message.content or ""}

    @staticmethod
    def _chat_hit(hit: CacheHit) -> ChatResponse:
        value = hit.value
        return ChatResponse(message=ChatMessage(role=MessageRole(value["role"]),
                                                content=value["content"]),
                            additional_kwargs=_marks(hit))

    @staticmethod
    def _completion_hit(hit: CacheHit) -> CompletionResponse:
        return CompletionResponse(text=hit.value["text"], additional_kwargs=_marks(hit))

    # -- the eight methods (no callback decorators: the inner LLM emits the events) -----
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._request(kwargs, messages=messages)
        hit = self._cache.lookup(**request)
        if hit is not None:
            return self._chat_hit(hit)
        response = self.llm.chat(messages, **self._inner_kwargs(kwargs))
        self._store(request, response, self._chat_value(response))
        return response

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        request = self._request(kwargs, prompt=prompt)
        hit = self._cache.lookup(**request)
        if hit is not None:
            return self._completion_hit(hit)
        response = self.llm.complete(prompt, formatted=formatted, **self._inner_kwargs(kwargs))
        self._store(request, response, {"text": response.text})
        return response

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._request(kwargs, messages=messages)
        hit = await self._cache.alookup(**request)
        if hit is not None:
            return self._chat_hit(hit)
        response = await self.llm.achat(messages, **self._inner_kwargs(kwargs))
        self._store(request, response, self._chat_value(response))
        return response

    async def acomplete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponse:
        request = self._request(kwargs, prompt=prompt)
        hit = await self._cache.alookup(**request)
        if hit is not None:
            return self._completion_hit(hit)
        response = await self.llm.acomplete(prompt, formatted=formatted,
                                            **self._inner_kwargs(kwargs))
        self._store(request, response, {"text": response.text})
        return response

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._request(kwargs, messages=messages)
        hit = self._cache.lookup(**request)

        def gen() -> ChatResponseGen:
            if hit is not None:
                served = self._chat_hit(hit)
                served.delta = served.message.content
                yield served
                return
            last = None
            for last in self.llm.stream_chat(messages, **self._inner_kwargs(kwargs)):
                yield last
            if last is not None:
                self._store(request, last, self._chat_value(last))

        return gen()

    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        request = self._request(kwargs, prompt=prompt)
        hit = self._cache.lookup(**request)

        def gen() -> CompletionResponseGen:
            if hit is not None:
                served = self._completion_hit(hit)
                served.delta = served.text
                yield served
                return
            last = None
            for last in self.llm.stream_complete(prompt, formatted=formatted,
                                                 **self._inner_kwargs(kwargs)):
                yield last
            if last is not None:
                self._store(request, last, {"text": last.text})

        return gen()

    async def astream_chat(self, messages: Sequence[ChatMessage],
                           **kwargs: Any) -> ChatResponseAsyncGen:
        request = self._request(kwargs, messages=messages)
        hit = await self._cache.alookup(**request)

        async def gen() -> ChatResponseAsyncGen:
            if hit is not None:
                served = self._chat_hit(hit)
                served.delta = served.message.content
                yield served
                return
            last = None
            async for last in await self.llm.astream_chat(messages,
                                                          **self._inner_kwargs(kwargs)):
                yield last
            if last is not None:
                self._store(request, last, self._chat_value(last))

        return gen()

    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        request = self._request(kwargs, prompt=prompt)
        hit = await self._cache.alookup(**request)

        async def gen() -> CompletionResponseAsyncGen:
            if hit is not None:
                served = self._completion_hit(hit)
                served.delta = served.text
                yield served
                return
            last = None
            async for last in await self.llm.astream_complete(
                    prompt, formatted=formatted, **self._inner_kwargs(kwargs)):
                yield last
            if last is not None:
                self._store(request, last, {"text": last.text})

        return gen()
