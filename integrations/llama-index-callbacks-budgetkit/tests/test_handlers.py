"""LlamaIndex handlers: instrumentation events and the legacy CallbackManager, with mocks and
with the real llama-index OpenAI clients pointed at a local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms import ChatMessage
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from budgetkit import Budget, BudgetExceeded, Engine
from llama_index.callbacks.budgetkit import (BudgetkitCallbackHandler, BudgetkitEventHandler,
                                             attribution)

MESSAGES = [ChatMessage(role="system", content="You are terse."),
            ChatMessage(role="user", content="What is the capital of France?")]


def openai_llm(server, handler=None, **kwargs) -> OpenAI:
    extra = {"callback_manager": CallbackManager([handler])} if handler is not None else {}
    return OpenAI(model=kwargs.pop("model", "gpt-4o-mini"), api_base=server.base_url,
                  api_key="test-key", max_retries=0, **extra, **kwargs)


def assert_matches_server(engine: Engine, row: Any, usage: dict, model: str) -> None:
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert (row.input_tokens, row.output_tokens) == (usage["prompt_tokens"],
                                                     usage["completion_tokens"])
    assert row.cached_input_tokens == cached
    assert row.reasoning_tokens == usage["completion_tokens_details"]["reasoning_tokens"]
    assert row.usage_source == "provider"
    assert row.cost_nanos == engine.catalog.get(model).cost_nanos(
        usage["prompt_tokens"], usage["completion_tokens"], cached_input_tokens=cached)


# ---------------------------------------------------------------------------- mocks

def test_mock_llm_chat_is_one_row_not_two(engine, mocks, root_dispatcher):
    handler = BudgetkitEventHandler(engine).register(root_dispatcher)
    mocks.LLM().chat(MESSAGES)  # chat() runs complete() inside: two event pairs, one call
    [row] = engine.usage()
    assert row.operation_type == "chat_completion" and row.usage_source == "estimated"
    assert row.input_tokens == engine.count_message_tokens(
        [{"role": m.role.value, "content": m.content} for m in MESSAGES], "gpt-4o-mini")
    assert row.output_tokens > 0 and row.cost_nanos > 0
    assert handler.calls == 1


def test_mock_completion_stream_and_embeddings(engine, mocks, root_dispatcher):
    BudgetkitEventHandler(engine).register(root_dispatcher)
    llm, embedding = mocks.LLM(), mocks.Embedding(embed_dim=4)
    llm.complete("Once upon a time")
    streamed = "".join(r.delta or "" for r in llm.stream_complete("Tell me a story"))
    embedding.get_text_embedding_batch(["first chunk of text", "second chunk"])
    embedding.get_query_embedding("what happened?")
    rows = engine.usage()
    assert [r.operation_type for r in rows] == ["text_generation", "text_generation",
                                                 "embedding", "query_embedding"]
    assert rows[1].output_tokens == engine.count_tokens(streamed, "gpt-4o-mini")
    assert rows[2].input_tokens == (engine.count_tokens("first chunk of text",
                                                        "text-embedding-3-small")
                                    + engine.count_tokens("second chunk",
                                                          "text-embedding-3-small"))
    assert rows[3].model == "text-embedding-3-small"


def test_attribution_context_and_handler_defaults(engine, mocks, root_dispatcher):
    BudgetkitEventHandler(engine, project="rag-app", tags=["prod"]).register(root_dispatcher)
    llm = mocks.LLM()
    with attribution(user_id="alice", session_id="s-9", tags=["support"],
                     metadata={"ticket": 7}):
        with attribution(user_id="bob"):
            llm.complete("inner")
        llm.complete("outer")
    llm.complete("outside")
    inner, outer, outside = engine.usage()
    assert (inner.user_id, inner.session_id, inner.project) == ("bob", "s-9", "rag-app")
    assert outer.user_id == "alice" and outer.tags == ["prod", "support"]
    assert outer.metadata_ == {"ticket": 7}
    assert outside.user_id is None and outside.tags == ["prod"]


async def test_async_calls_in_concurrent_tasks(engine, mocks, root_dispatcher):
    BudgetkitEventHandler(engine).register(root_dispatcher)
    llm = mocks.LLM()

    async def one(i: int) -> None:
        with attribution(user_id=f"user-{i}"):
            await llm.achat([ChatMessage(role="user", content=f"question {i}")])

    await asyncio.gather(*(one(i) for i in range(20)))
    rows = engine.usage()
    assert len(rows) == 20
    assert {row.user_id for row in rows} == {f"user-{i}" for i in range(20)}


def test_legacy_handler_records_the_same_rows(engine, mocks):
    handler = BudgetkitCallbackHandler(engine, user_id="carol")
    manager = CallbackManager([handler])
    mocks.LLM(callback_manager=manager).chat(MESSAGES)
    mocks.Embedding(embed_dim=4, callback_manager=manager).get_query_embedding("query")
    chat_row, embedding_row = engine.usage()
    assert chat_row.operation_type == "chat_completion" and chat_row.user_id == "carol"
    assert embedding_row.operation_type == "query_embedding"
    assert handler.calls == 2


def tiny_budget(engine: Engine) -> None:
    engine.add_budget(Budget(limit=0.000001, require_approval=False))  # no call fits


def test_legacy_handler_stops_the_call_before_the_provider(engine, fake_openai):
    tiny_budget(engine)
    llm = openai_llm(fake_openai, BudgetkitCallbackHandler(engine))
    with pytest.raises(BudgetExceeded):
        llm.chat(MESSAGES)
    with pytest.raises(BudgetExceeded):
        asyncio.run(llm.acomplete("hello"))
    assert fake_openai.request_count == 0
    assert [row.status for row in engine.usage()] == ["blocked", "blocked"]


def test_event_handler_records_but_cannot_stop(engine, fake_openai, root_dispatcher):
    tiny_budget(engine)
    BudgetkitEventHandler(engine).register(root_dispatcher)
    openai_llm(fake_openai).chat(MESSAGES)  # tracking only: the call goes through
    assert fake_openai.request_count == 1
    [row] = engine.usage()
    assert row.status == "ok" and row.cost_nanos > 0


# ---------------------------------------------------------------------------- real clients

@pytest.mark.parametrize("path", ["events", "legacy"])
@pytest.mark.parametrize("mode", ["chat", "achat", "stream_chat", "astream_chat", "complete"])
def test_openai_llm_rows_equal_server_usage(engine, fake_openai, root_dispatcher, path, mode):
    fake_openai.configure(cached_tokens=5, reasoning_tokens=30,
                          response_model="gpt-4o-mini-2024-07-18")
    handler = None
    if path == "events":
        BudgetkitEventHandler(engine).register(root_dispatcher)
    else:
        handler = BudgetkitCallbackHandler(engine)
    llm = openai_llm(fake_openai, handler,
                     additional_kwargs={"stream_options": {"include_usage": True}})
    if mode == "chat":
        llm.chat(MESSAGES)
    elif mode == "achat":
        asyncio.run(llm.achat(MESSAGES))
    elif mode == "stream_chat":
        text = "".join(r.delta or "" for r in llm.stream_chat(MESSAGES))
        assert text == fake_openai.reply
    elif mode == "astream_chat":
        async def consume() -> None:
            async for _ in await llm.astream_chat(MESSAGES):
                pass
        asyncio.run(consume())
    else:
        llm.complete("Say hi")
    [row] = engine.usage()
    [usage] = fake_openai.usages
    assert_matches_server(engine, row, usage, "gpt-4o-mini")
    assert row.model == "gpt-4o-mini-2024-07-18"


def test_openai_stream_without_usage_is_estimated(engine, fake_openai, root_dispatcher):
    BudgetkitEventHandler(engine).register(root_dispatcher)
    list(openai_llm(fake_openai).stream_chat(MESSAGES))  # no include_usage asked
    [row] = engine.usage()
    assert row.usage_source == "estimated" and row.cost_nanos > 0
    assert row.output_tokens == engine.count_tokens(fake_openai.reply, "gpt-4o-mini")


@pytest.mark.parametrize("path", ["events", "legacy"])
def test_openai_embedding_rows_equal_server_usage(engine, fake_openai, root_dispatcher, path):
    extra: dict[str, Any] = {}
    if path == "events":
        BudgetkitEventHandler(engine).register(root_dispatcher)
    else:
        extra["callback_manager"] = CallbackManager([BudgetkitCallbackHandler(engine)])
    embedding = OpenAIEmbedding(model="text-embedding-3-small", api_base=fake_openai.base_url,
                                api_key="test-key", max_retries=0, **extra)
    embedding.get_text_embedding_batch(["alpha beta gamma", "delta epsilon"])
    embedding.get_query_embedding("which greek letter?")
    documents, query = engine.usage()
    assert documents.input_tokens == fake_openai.usages[0]["prompt_tokens"]
    assert query.input_tokens == fake_openai.usages[1]["prompt_tokens"]
    assert (documents.operation_type, query.operation_type) == ("embedding", "query_embedding")
    assert query.cost_nanos == engine.catalog.get("text-embedding-3-small").cost_nanos(
        query.input_tokens)


@pytest.mark.parametrize("path", ["events", "legacy"])
def test_provider_error_is_an_error_row(engine, fake_openai, root_dispatcher, path):
    handler = None
    if path == "events":
        BudgetkitEventHandler(engine).register(root_dispatcher)
    else:
        handler = BudgetkitCallbackHandler(engine)
    fake_openai.fail_next(400, "bad request")
    with pytest.raises(Exception, match="bad request"):
        openai_llm(fake_openai, handler).chat(MESSAGES)
    [row] = engine.usage()
    assert row.status == "error" and row.cost_nanos == 0


def test_calls_recorded_elsewhere_are_skipped(engine, mocks, root_dispatcher):
    from budgetkit.routing import metered_call
    from llama_index.core.llms import CompletionResponse

    handler = BudgetkitEventHandler(engine).register(root_dispatcher)
    llm = mocks.LLM()
    with metered_call():  # a routed LLM admitted this call itself
        llm.complete("metered")
    tracker = handler._tracker
    assert tracker.enter("span-1")
    tracker.begin("span-1", "gpt-4o-mini", tracker.attribution("span-1", "chat_completion"),
                  prompt="hi", admit=False)
    hit = CompletionResponse(text="cached", additional_kwargs={"budgetkit_cache_hit": True})
    tracker.finish("span-1", text=hit.text, raw=hit.raw,
                   additional_kwargs=hit.additional_kwargs)
    assert engine.usage() == []
    llm.complete("plain")
    assert len(engine.usage()) == 1


def test_legacy_handler_admits_repeat_calls_in_a_lane(engine, mocks, monkeypatch):
    from budgetkit.budgets import AdmissionLane
    from budgetkit.budgets import LEASE_AFTER

    outcomes: list[bool] = []
    admit = AdmissionLane.admit

    def spy(self, *args, **kwargs):
        held = admit(self, *args, **kwargs)
        outcomes.append(held is not None)
        return held

    monkeypatch.setattr(AdmissionLane, "admit", spy)
    engine.add_budget(Budget(name="day", limit=100.0))
    engine.add_budget(Budget(name="dana", limit=100.0, scope="user", match="dana"))
    llm = mocks.LLM(callback_manager=CallbackManager([BudgetkitCallbackHandler(
        engine, user_id="dana")]))
    calls = LEASE_AFTER + 40
    for _ in range(calls):
        llm.chat(MESSAGES)
    assert sum(outcomes) >= 30  # admitted in memory, their tickets built at the end
    rows = engine.usage()
    assert len(rows) == calls and {row.user_id for row in rows} == {"dana"}
    status = {item.budget: item for item in engine.budget_status()}
    total = sum(row.cost_nanos for row in rows) / 1e9
    assert status["day"].used == pytest.approx(total)
    assert status["dana"].used == pytest.approx(total)
    assert all(item.reserved == 0 for item in status.values())
