"""CachedLLM: the eight methods, hit markers, ledger rows, tenants, semantic hits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.base.llms.types import (ChatMessage, CompletionResponse,
                                              CompletionResponseGen, LLMMetadata)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback

from budgetkit import ConfigurationError, Engine
from budgetkit.cache import MiniLMEmbedder
from llama_index.callbacks.budgetkit import attribution
from llama_index.llms.budgetkit._cached import CACHE_HIT_MARK, CachedLLM

MODEL = "gpt-4o-mini"


class PricedLLM(CustomLLM):
    """Answers ``reply`` (echoing the prompt's last word) with OpenAI-style usage in raw."""

    reply: str = "an answer"
    temperature: float = 0.0
    _calls: int = PrivateAttr(default=0)  # state, not configuration: not part of the key

    @property
    def calls(self) -> int:
        return self._calls

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=16_000, num_output=256, model_name=MODEL)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._calls += 1
        return CompletionResponse(text=f"{self.reply} ({prompt.split()[-1]})", raw={
            "usage": {"prompt_tokens": 900, "completion_tokens": 100}})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        self._calls += 1

        def gen() -> CompletionResponseGen:
            yield CompletionResponse(text="an", delta="an")
            yield CompletionResponse(text="an answer", delta=" answer", raw={
                "usage": {"prompt_tokens": 900, "completion_tokens": 100}})

        return gen()


class MiniLMEmbedding(BaseEmbedding):
    """A LlamaIndex embedding model over the local MiniLM (what users pass as embed_model)."""

    def _get_query_embedding(self, query: str) -> list[float]:
        return _MINILM(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return _MINILM(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return _MINILM(text)


_MODEL: list[MiniLMEmbedder] = []


def _MINILM(text: str) -> list[float]:  # noqa: N802
    if not _MODEL:
        _MODEL.append(MiniLMEmbedder())
    return _MODEL[0]([text])[0].tolist()


class Events(BaseEventHandler):
    names: list[str] = []

    @classmethod
    def class_name(cls) -> str:
        return "Events"

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.names.append(event.class_name())


@pytest.fixture
def engine(tmp_path: Path):
    with Engine(db=str(tmp_path / "usage.db")) as eng:
        yield eng


def test_hits_skip_the_inner_llm_and_are_recorded_with_the_saving(engine: Engine) -> None:
    inner = PricedLLM()
    llm = CachedLLM(llm=inner, engine=engine, namespace="acme")
    events = Events(names=[])
    get_dispatcher().add_event_handler(events)
    try:
        first = llm.complete("What is the capital of France?")
        before = len(events.names)
        second = llm.complete("What is the capital of France?")
    finally:
        get_dispatcher().event_handlers.remove(events)
    assert inner.calls == 1 and second.text == first.text
    assert second.additional_kwargs[CACHE_HIT_MARK] is True
    assert len(events.names) == before  # a hit fires no LLM events: nothing to double count
    rows = engine.usage(status="cached")
    assert len(rows) == 1
    assert rows[0].cost_nanos == 0
    assert rows[0].saved_nanos == engine.catalog.get(MODEL).cost_nanos(900, 100)
    assert llm.response_cache.stats("acme").hits == 1


def test_a_personal_question_is_never_served_to_another_user(engine: Engine) -> None:
    inner = PricedLLM()
    llm = CachedLLM(llm=inner, engine=engine, user_id="default-user")
    with attribution(user_id="ana"):
        llm.complete("Where is my order?")
    with attribution(user_id="bob"):
        bob = llm.complete("Where is my order?")
    assert inner.calls == 2 and CACHE_HIT_MARK not in bob.additional_kwargs
    assert CACHE_HIT_MARK not in llm.complete("Where is my order?").additional_kwargs
    with attribution(user_id="ana"):
        again = llm.complete("Where is my order?")
    assert inner.calls == 3 and again.additional_kwargs[CACHE_HIT_MARK] is True
    # shared knowledge stays shared, whoever asks
    with attribution(user_id="ana"):
        llm.complete("What is the capital of France?")
    with attribution(user_id="bob"):
        shared = llm.complete("What is the capital of France?")
    assert inner.calls == 4 and shared.additional_kwargs[CACHE_HIT_MARK] is True
    assert [row.user_id for row in engine.usage(status="cached")] == ["ana", "bob"]


def test_chat_stream_and_async_forms(engine: Engine) -> None:
    inner = PricedLLM()
    llm = CachedLLM(llm=inner, engine=engine)
    messages = [ChatMessage(role="system", content="Be brief."),
                ChatMessage(role="user", content="Name a colour.")]
    first = llm.chat(messages)
    assert llm.chat(messages).message.content == first.message.content
    assert asyncio.run(llm.achat(messages)).additional_kwargs[CACHE_HIT_MARK] is True
    assert inner.calls == 1
    streamed = list(llm.stream_complete("Stream this"))
    assert streamed[-1].text == "an answer" and inner.calls == 2
    replay = list(llm.stream_complete("Stream this"))
    assert [chunk.text for chunk in replay] == ["an answer"] and inner.calls == 2
    assert asyncio.run(llm.acomplete("Stream this")).text == "an answer"

    async def collect() -> list[str]:
        return [chunk.delta async for chunk in await llm.astream_complete("Stream this")]

    assert asyncio.run(collect()) == ["an answer"] and inner.calls == 2


def test_tenants_settings_and_arguments_are_kept_apart(engine: Engine) -> None:
    inner = PricedLLM()
    tenant_a = CachedLLM(llm=inner, engine=engine, namespace="a")
    tenant_b = CachedLLM(llm=inner, engine=engine, namespace="b")
    tenant_a.complete("hello")
    tenant_b.complete("hello")
    assert inner.calls == 2
    tenant_a.complete("hello", max_tokens=5)
    assert inner.calls == 3
    warmer = CachedLLM(llm=PricedLLM(temperature=0.9), engine=engine, namespace="a")
    warmer.complete("hello")
    assert warmer.llm.calls == 1  # a different temperature is a different answer


def test_semantic_hits_with_a_llama_index_embedding(engine: Engine) -> None:
    inner = PricedLLM()
    llm = CachedLLM(llm=inner, engine=engine, embed_model=MiniLMEmbedding())
    llm.complete("What is the capital of France?")
    hit = llm.complete("Which city is the capital of France?")
    assert inner.calls == 1 and hit.additional_kwargs["budgetkit_cache"] == "semantic"
    llm.complete("What is the capital of Germany?")
    assert inner.calls == 2


def test_bad_arguments_are_typed_errors(engine: Engine) -> None:
    with pytest.raises(ConfigurationError, match="LlamaIndex LLM"):
        CachedLLM(llm="gpt-4o", engine=engine)
    with pytest.raises(ConfigurationError, match="engine= or cache="):
        CachedLLM(llm=PricedLLM())


def test_caches_in_front_of_the_routed_llm(engine: Engine) -> None:
    from llama_index.llms.budgetkit import RoutedLLM

    inner = PricedLLM()
    routed = RoutedLLM(models={MODEL: inner}, default_model=MODEL, engine=engine)
    llm = CachedLLM(llm=routed, engine=engine)
    first = llm.complete("Summarise our refund policy.")
    second = llm.complete("Summarise our refund policy.")
    assert inner.calls == 1 and second.text == first.text
    statuses = sorted(row.status for row in engine.usage())
    assert statuses == ["cached", "ok"]  # the routed call once, the hit once
