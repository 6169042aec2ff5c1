"""Real langchain-openai clients against a local OpenAI-compatible server.

Recorded tokens must equal the usage the server sent, and the cost must equal the catalog
price of exactly those tokens, for every way of calling a model. The golden cases are the
ones other trackers get wrong (LiteLLM issues #11789, #6215, #9812, #13957).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_openai import ChatOpenAI, OpenAI, OpenAIEmbeddings

from budgetkit import Engine
from langchain_budgetkit import BudgetkitCallbackHandler, MeteredEmbeddings


def chat(server, **kwargs) -> ChatOpenAI:
    kwargs.setdefault("model", "gpt-4o-mini")
    return ChatOpenAI(base_url=server.base_url, api_key="test-key", max_retries=0,
                      stream_usage=True, **kwargs)


def assert_matches_server(engine: Engine, row, usage: dict, model: str) -> None:
    details = usage.get("prompt_tokens_details") or {}
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    assert row.input_tokens == usage["prompt_tokens"]
    assert row.output_tokens == usage["completion_tokens"]
    assert row.cached_input_tokens == details.get("cached_tokens", 0)
    assert row.cache_write_tokens == details.get("cache_write_tokens", 0)
    assert row.reasoning_tokens == reasoning
    assert row.usage_source == "provider"
    assert row.cost_nanos == engine.catalog.get(model).cost_nanos(
        usage["prompt_tokens"], usage["completion_tokens"],
        cached_input_tokens=details.get("cached_tokens", 0),
        cache_write_tokens=details.get("cache_write_tokens", 0))


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "astream"])
def test_chat_openai_rows_equal_server_usage(engine, fake_openai, mode):
    fake_openai.configure(cached_tokens=6, reasoning_tokens=40,
                          response_model="gpt-4o-mini-2024-07-18")
    llm = chat(fake_openai)
    config = {"callbacks": [BudgetkitCallbackHandler(engine)]}
    prompt = "Explain prompt caching in one sentence, please."
    if mode == "invoke":
        llm.invoke(prompt, config=config)
    elif mode == "ainvoke":
        asyncio.run(llm.ainvoke(prompt, config=config))
    elif mode == "stream":
        assert "".join(c.content for c in llm.stream(prompt, config=config)) == fake_openai.reply
    else:
        async def consume() -> None:
            async for _ in llm.astream(prompt, config=config):
                pass
        asyncio.run(consume())
    [row] = engine.usage()
    [usage] = fake_openai.usages
    assert usage["prompt_tokens_details"]["cached_tokens"] == 6  # the golden part is there
    assert_matches_server(engine, row, usage, "gpt-4o-mini")
    assert row.model == "gpt-4o-mini-2024-07-18"


def test_batch_rows_equal_server_usage(engine, fake_openai):
    fake_openai.configure(reply=lambda body: "answer to " + body["messages"][-1]["content"])
    llm = chat(fake_openai)
    prompts = [f"question number {i}" + " padding" * i for i in range(6)]
    llm.batch(prompts, config={"callbacks": [BudgetkitCallbackHandler(engine)],
                               "max_concurrency": 3})
    rows = engine.usage()
    assert len(rows) == 6 == fake_openai.request_count
    assert sorted(r.input_tokens for r in rows) == sorted(u["prompt_tokens"]
                                                          for u in fake_openai.usages)
    assert sum(r.cost_nanos for r in rows) == sum(
        engine.catalog.get("gpt-4o-mini").cost_nanos(u["prompt_tokens"], u["completion_tokens"])
        for u in fake_openai.usages)


def test_nested_lcel_chain_with_two_model_calls(engine, fake_openai):
    llm = chat(fake_openai)
    chain = (ChatPromptTemplate.from_template("Name a city in {country}.") | llm
             | StrOutputParser() | RunnableLambda(lambda city: f"Describe {city}.")
             | chat(fake_openai, model="gpt-4o") | StrOutputParser())
    chain.invoke({"country": "Italy"}, config={"callbacks": [BudgetkitCallbackHandler(engine)]})
    rows = engine.usage()
    assert [row.model for row in rows] == ["gpt-4o-mini", "gpt-4o"]
    assert rows[0].root_run_id == rows[1].root_run_id is not None
    for row, usage, model in zip(rows, fake_openai.usages, ["gpt-4o-mini", "gpt-4o"]):
        assert_matches_server(engine, row, usage, model)


# ---------------------------------------------------------------------------- golden costs

def test_cached_input_billed_at_cached_rate_when_streaming(engine, fake_openai):
    fake_openai.configure(prompt_tokens=10_000, cached_tokens=8_000, completion_tokens=100)
    llm = chat(fake_openai, model="gpt-4o")
    list(llm.stream("long shared prefix ...", config={
        "callbacks": [BudgetkitCallbackHandler(engine)]}))
    [row] = engine.usage()
    # gpt-4o: $2.50/M input, $1.25/M cached input, $10/M output
    assert row.cached_input_tokens == 8_000
    assert row.cost_nanos == 2_000 * 2_500 + 8_000 * 1_250 + 100 * 10_000


def test_cache_writes_counted_once(engine, fake_openai):
    fake_openai.configure(prompt_tokens=5_000, cache_write_tokens=4_000, completion_tokens=10)
    llm = chat(fake_openai, model="gpt-4.1")
    llm.invoke("prefix to cache", config={"callbacks": [BudgetkitCallbackHandler(engine)]})
    [row] = engine.usage()
    assert row.input_tokens == 5_000 and row.cache_write_tokens == 4_000
    assert row.total_tokens == 5_010  # writes are inside the input, not added again
    # gpt-4.1 has no separate write price: written tokens cost the input rate, once
    assert row.cost_nanos == 5_000 * 2_000 + 10 * 8_000


def test_reasoning_tokens_priced_as_output(engine, fake_openai):
    fake_openai.configure(prompt_tokens=50, completion_tokens=20, reasoning_tokens=980)
    llm = chat(fake_openai, model="o4-mini")
    llm.invoke("think hard", config={"callbacks": [BudgetkitCallbackHandler(engine)]})
    [row] = engine.usage()
    assert row.output_tokens == 1_000 and row.reasoning_tokens == 980
    assert row.cost_nanos == 50 * 1_100 + 1_000 * 4_400  # o4-mini: $1.10/M in, $4.40/M out


def test_stream_without_usage_is_estimated_not_free(engine, fake_openai):
    fake_openai.configure(stream_usage=False)  # a provider that never sends stream usage
    llm = chat(fake_openai)
    prompt = "Tell me something."
    list(llm.stream(prompt, config={"callbacks": [BudgetkitCallbackHandler(engine)]}))
    assert fake_openai.usages == []  # nothing reported
    [row] = engine.usage()
    assert row.usage_source == "estimated" and row.cost_nanos > 0
    assert row.input_tokens == engine.count_message_tokens(
        [{"role": "user", "content": prompt}], "gpt-4o-mini")
    assert row.output_tokens == engine.count_tokens(fake_openai.reply, "gpt-4o-mini")


def test_unpriced_model_is_never_a_silent_zero(engine, fake_openai, caplog):
    llm = chat(fake_openai, model="acme-llm-9000")
    with caplog.at_level(logging.WARNING, logger="budgetkit"):
        assert llm.invoke("hi", config={"callbacks": [BudgetkitCallbackHandler(engine)]}).content
    assert engine.usage() == []  # not a $0 row
    assert any("acme-llm-9000" in r.getMessage() for r in caplog.records)

    engine.catalog.fallback = "gpt-4o"
    llm.invoke("hi", config={"callbacks": [BudgetkitCallbackHandler(engine)]})
    [row] = engine.usage()
    usage = fake_openai.usages[-1]
    assert row.model == "acme-llm-9000"
    assert row.cost_nanos == engine.catalog.get("gpt-4o").cost_nanos(
        usage["prompt_tokens"], usage["completion_tokens"]) > 0


# ---------------------------------------------------------------------------- other clients

def test_legacy_completion_llm(engine, fake_openai):
    llm = OpenAI(model="gpt-3.5-turbo-instruct", base_url=fake_openai.base_url,
                 api_key="test-key", max_retries=0)
    llm.invoke("Once upon a time", config={"callbacks": [BudgetkitCallbackHandler(engine)]})
    [row] = engine.usage()
    [usage] = fake_openai.usages
    assert row.operation_type == "text_generation"
    assert (row.input_tokens, row.output_tokens) == (usage["prompt_tokens"],
                                                     usage["completion_tokens"])
    assert row.cost_nanos == engine.catalog.get("gpt-3.5-turbo-instruct").cost_nanos(
        usage["prompt_tokens"], usage["completion_tokens"])


def test_openai_embeddings_metered(engine, fake_openai):
    # check_embedding_ctx_length=False: OpenAIEmbeddings would otherwise fetch tiktoken's
    # files itself (budgetkit's bundled copies are its own, not registered in tiktoken).
    embeddings = MeteredEmbeddings(
        OpenAIEmbeddings(model="text-embedding-3-small", base_url=fake_openai.base_url,
                         api_key="test-key", max_retries=0, check_embedding_ctx_length=False),
        engine, user_id="indexer")
    docs = ["The quick brown fox.", "jumps over the lazy dog", "ünïcödé text ✓"]
    vectors = embeddings.embed_documents(docs)
    query = asyncio.run(embeddings.aembed_query("where is the fox?"))
    assert len(vectors) == 3 and len(query) == fake_openai.embedding_dim
    documents_row, query_row = engine.usage()
    assert documents_row.operation_type == "embedding"
    assert query_row.operation_type == "query_embedding"
    assert documents_row.input_tokens == fake_openai.usages[0]["prompt_tokens"]
    assert query_row.input_tokens == fake_openai.usages[1]["prompt_tokens"]
    assert documents_row.cost_nanos == engine.catalog.get("text-embedding-3-small").cost_nanos(
        documents_row.input_tokens)
    assert documents_row.user_id == "indexer"


def test_server_error_is_an_error_row(engine, fake_openai):
    fake_openai.fail_next(500, "overloaded")
    llm = chat(fake_openai)
    with pytest.raises(Exception, match="overloaded"):
        llm.invoke("hi", config={"callbacks": [BudgetkitCallbackHandler(engine)]})
    [row] = engine.usage()
    assert row.status == "error" and row.cost_nanos == 0


def test_legacy_llm_batch_in_one_request_is_counted_once(engine, fake_openai):
    llm = OpenAI(model="gpt-3.5-turbo-instruct", base_url=fake_openai.base_url,
                 api_key="test-key", max_retries=0)
    llm.batch(["first prompt", "second, longer prompt", "third"],
              config={"callbacks": [BudgetkitCallbackHandler(engine)]})
    assert fake_openai.request_count == 1  # LangChain sends the three prompts together
    [usage] = fake_openai.usages
    rows = engine.usage()
    assert len(rows) == 3
    assert sum(r.input_tokens for r in rows) == usage["prompt_tokens"]
    assert sum(r.output_tokens for r in rows) == usage["completion_tokens"]
    assert sum(r.cost_nanos for r in rows) == engine.catalog.get(
        "gpt-3.5-turbo-instruct").cost_nanos(usage["prompt_tokens"], usage["completion_tokens"])
