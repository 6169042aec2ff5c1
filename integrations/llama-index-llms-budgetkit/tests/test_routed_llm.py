"""RoutedLLM: routing, cascade, fallback, the 8 methods, events of the inner LLM, query engine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.llms.types import (ChatMessage, CompletionResponse,
                                              CompletionResponseGen, LLMMetadata)
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import (LLMChatStartEvent,
                                                         LLMCompletionStartEvent)
from llama_index.core.llms import CustomLLM, MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback

from budgetkit import (BudgetExceeded, Cascade, ConfigurationError, Engine, Fallback,
                       MinLength, Router)
from budgetkit.routing import is_metered_call
from llama_index.llms.budgetkit import RoutedLLM
from llama_index.llms.budgetkit._routed import ROUTED_MARKER

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"
TIERS = {"low": CHEAP, "high": STRONG}


class UsageLLM(CustomLLM):
    """Answers ``reply`` with OpenAI-style usage in ``raw``; ``fail`` raises instead."""

    reply: str = "an answer"
    fail: BaseException | None = None
    calls: int = 0
    metered: list[bool] = []

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=16_000, num_output=256, model_name="usage-fake")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.calls += 1
        self.metered.append(is_metered_call())
        if self.fail is not None:
            raise self.fail
        return CompletionResponse(text=self.reply, raw={
            "usage": {"prompt_tokens": 9, "completion_tokens": 4}})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        words = self.reply.split(" ")

        def gen() -> CompletionResponseGen:
            text = ""
            for i, word in enumerate(words):
                delta = word if i == 0 else " " + word
                text += delta
                last = i == len(words) - 1
                yield CompletionResponse(text=text, delta=delta, raw={
                    "usage": {"prompt_tokens": 9, "completion_tokens": 4}} if last else None)

        return gen()


class RateLimitError(Exception):
    status_code = 429


@pytest.fixture
def engine(tmp_path: Path):
    with Engine(db=str(tmp_path / "usage.db")) as eng:
        yield eng


def routed(cheap=None, strong=None, **kwargs) -> RoutedLLM:
    kwargs.setdefault("router", Router(TIERS))
    return RoutedLLM(models={CHEAP: cheap or UsageLLM(reply="cheap answer", metered=[]),
                             STRONG: strong or UsageLLM(reply="strong answer", metered=[])},
                     **kwargs)


def test_complete_and_chat_route_per_call(engine: Engine) -> None:
    llm = routed(engine=engine)
    assert llm.complete("What is 2 + 2?").text == "cheap answer"
    hard = llm.complete("Review this", task_type="code_review")
    assert hard.text == "strong answer"
    assert hard.additional_kwargs[ROUTED_MARKER]["model"] == STRONG
    chat = llm.chat([ChatMessage(role="user", content="hi")])
    assert chat.message.content == "cheap answer"
    rows = engine.usage()
    assert sorted(r.model for r in rows) == sorted([CHEAP, STRONG, CHEAP])
    strong_row = next(r for r in rows if r.model == STRONG)
    assert strong_row.route_reason.startswith("task type code_review")
    cheap_row = next(r for r in rows if r.operation_type == "text_generation" and r.model != STRONG)
    assert (cheap_row.input_tokens, cheap_row.output_tokens) == (9, 4)
    assert cheap_row.usage_source == "provider"
    assert llm.last_decision is not None and llm.last_decision.model == CHEAP


def test_metadata_is_the_model_it_will_start_on() -> None:
    llm = routed()
    assert llm.metadata.model_name == CHEAP and llm.metadata.context_window == 16_000
    assert routed(default_model=STRONG).metadata.model_name == STRONG


def test_inner_calls_are_marked_metered_only_with_an_engine(engine: Engine) -> None:
    cheap = UsageLLM(reply="x", metered=[])
    routed(cheap, engine=engine).complete("hi")
    routed(cheap).complete("hi")
    assert cheap.metered == [True, False]
    assert is_metered_call() is False


def test_events_come_from_the_inner_llm_only() -> None:
    seen: list[str] = []

    class Spy(BaseEventHandler):
        @classmethod
        def class_name(cls) -> str:
            return "Spy"

        def handle(self, event, **kwargs) -> None:
            if isinstance(event, (LLMCompletionStartEvent, LLMChatStartEvent)):
                seen.append(event.model_dict.get("class_name"))

    dispatcher = get_dispatcher()
    spy = Spy()
    dispatcher.add_event_handler(spy)
    try:
        llm = routed(MockLLM(), MockLLM())
        llm.complete("hello")
        llm.chat([ChatMessage(role="user", content="hi")])
        list(llm.stream_complete("abc"))
    finally:
        dispatcher.event_handlers.remove(spy)
    assert seen and set(seen) == {"MockLLM"}


def test_cascade_escalates_and_records_attempts(engine: Engine) -> None:
    llm = RoutedLLM(models={CHEAP: MockLLM(), STRONG: MockLLM(max_tokens=8)},
                    cascade=Cascade([CHEAP, STRONG], [MinLength(20)]), engine=engine)
    out = llm.complete("hi")
    assert out.text == " ".join(["text"] * 8)
    assert out.additional_kwargs[ROUTED_MARKER]["attempts"] == 2
    rows = sorted(engine.usage(), key=lambda r: r.attempt)
    assert [(r.model, r.attempt, r.usage_source) for r in rows] == [
        (CHEAP, 1, "estimated"), (STRONG, 2, "estimated")]
    assert "too short" in rows[1].route_reason


def test_fallback_and_budget_stop(engine: Engine) -> None:
    failing = UsageLLM(fail=RateLimitError("slow"), metered=[])
    llm = routed(failing, engine=engine,
                 fallback=Fallback([CHEAP, STRONG], max_retries=1, sleep=lambda s: None))
    assert llm.complete("hi").text == "strong answer" and failing.calls == 2
    assert sorted((r.model, r.status) for r in engine.usage()) == [
        (STRONG, "ok"), (CHEAP, "error"), (CHEAP, "error")]

    blocked = UsageLLM(fail=BudgetExceeded("daily budget"), metered=[])
    strong = UsageLLM(reply="never", metered=[])
    llm = routed(blocked, strong, fallback=Fallback([CHEAP, STRONG], sleep=lambda s: None))
    with pytest.raises(BudgetExceeded):
        llm.complete("hi")
    assert strong.calls == 0


def test_streams_sync_and_async(engine: Engine) -> None:
    llm = routed(UsageLLM(reply="one two three", metered=[]), engine=engine)
    pieces = list(llm.stream_complete("hi"))
    assert "".join(p.delta for p in pieces) == "one two three"
    chat_pieces = list(llm.stream_chat([ChatMessage(role="user", content="hi")]))
    assert chat_pieces[-1].message.content == "one two three"

    async def go():
        done = await llm.acomplete("hi")
        chat = await llm.achat([ChatMessage(role="user", content="hi")])
        stream = [p.delta async for p in await llm.astream_complete("hi")]
        chat_stream = [p async for p in await llm.astream_chat(
            [ChatMessage(role="user", content="hi")])]
        return done, chat, stream, chat_stream

    done, chat, stream, chat_stream = asyncio.run(go())
    assert done.text == chat.message.content == "one two three"
    assert "".join(stream) == "one two three"
    assert chat_stream[-1].message.content == "one two three"
    rows = engine.usage()
    assert len(rows) == 6 and all(r.status == "ok" for r in rows)
    streamed = [r for r in rows if r.operation_type == "text_generation"]
    assert any((r.input_tokens, r.output_tokens) == (9, 4) for r in streamed)


def test_stream_falls_back_when_opening_fails(engine: Engine) -> None:
    llm = routed(UsageLLM(fail=RateLimitError("x"), metered=[]),
                 UsageLLM(reply="from strong", metered=[]), engine=engine,
                 fallback=Fallback([CHEAP, STRONG], max_retries=0))
    assert "".join(p.delta for p in llm.stream_complete("hi")) == "from strong"


def test_stream_with_cascade_serves_an_accepted_cheap_answer_whole(engine: Engine) -> None:
    llm = RoutedLLM(models={CHEAP: UsageLLM(reply="cheap but long enough", metered=[]),
                            STRONG: UsageLLM(reply="never", metered=[])},
                    cascade=Cascade([CHEAP, STRONG], [MinLength(5)]), engine=engine)
    pieces = list(llm.stream_complete("hi"))
    assert [p.delta for p in pieces] == ["cheap but long enough"]


def test_works_as_settings_llm_in_a_query_engine(engine: Engine) -> None:
    previous_llm, previous_embed = Settings._llm, Settings._embed_model
    try:
        Settings.llm = routed(MockLLM(), MockLLM(max_tokens=3), engine=engine)
        Settings.embed_model = MockEmbedding(embed_dim=8)
        index = VectorStoreIndex.from_documents(
            [Document(text="budgetkit routes cheap prompts to cheap models."),
             Document(text="Paris is the capital of France.")])
        response = index.as_query_engine().query("What is the capital of France?")
    finally:
        Settings._llm, Settings._embed_model = previous_llm, previous_embed
    assert "capital of France" in str(response)  # MockLLM echoes the packed prompt
    (row,) = engine.usage()
    assert row.model == CHEAP and row.route_reason.startswith("score ")


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="needs models"):
        RoutedLLM(models={})
    with pytest.raises(ConfigurationError, match="gpt-4.1"):
        RoutedLLM(models={CHEAP: MockLLM()}, router=Router({"low": CHEAP, "high": "gpt-4.1"}))
    with pytest.raises(ConfigurationError, match="not one of the routed models"):
        routed().complete("x", model="gpt-4.1")
