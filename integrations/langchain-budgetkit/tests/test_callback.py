"""BudgetkitCallbackHandler on fake chat models: usage, attribution, run trees, errors, stops."""

from __future__ import annotations

import asyncio
import logging

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from budgetkit import Budget, BudgetExceeded, Engine, UnknownModelError
from langchain_budgetkit import (AsyncBudgetkitCallbackHandler, BudgetkitCallbackHandler,
                                 get_budgetkit_callback)
from langchain_budgetkit._usage_parse import usage_from_metadata

USAGE = {"input_tokens": 1200, "output_tokens": 300, "total_tokens": 1500,
         "input_token_details": {"cache_read": 1000},
         "output_token_details": {"reasoning": 100}}


def price(engine: Engine, model: str, *args: int, **kwargs: int) -> int:
    return engine.catalog.get(model).cost_nanos(*args, **kwargs)


def test_invoke_records_provider_usage_priced_at_each_rate(engine, usage_model):
    model = usage_model(usage=USAGE, response_model="gpt-4o-mini-2024-07-18")
    handler = BudgetkitCallbackHandler(engine)
    model.invoke("What is the capital of France?", config={"callbacks": [handler]})

    [row] = engine.usage()
    assert (row.input_tokens, row.output_tokens, row.cached_input_tokens,
            row.reasoning_tokens) == (1200, 300, 1000, 100)
    assert row.model == "gpt-4o-mini-2024-07-18"  # the response's model, priced as gpt-4o-mini
    # 200 plain input at $0.15/M, 1000 cached at $0.075/M, 300 output at $0.60/M
    assert row.cost_nanos == 200 * 150 + 1000 * 75 + 300 * 600
    assert row.cost_nanos == price(engine, "gpt-4o-mini", 1200, 300, cached_input_tokens=1000)
    assert row.usage_source == "provider" and row.status == "ok"
    assert row.operation_type == "chat_completion"
    assert handler.calls == 1 and handler.cost_nanos == row.cost_nanos
    assert handler.total_tokens == 1500


def test_attribution_from_run_metadata_tags_and_handler_defaults(engine, usage_model):
    model = usage_model(usage=USAGE)
    handler = BudgetkitCallbackHandler(engine, user_id="default-user", project="bot",
                                       tags=["prod"], metadata={"team": "search"})
    model.invoke("hi", config={"callbacks": [handler], "tags": ["experiment-7"],
                               "metadata": {"user_id": "alice", "session_id": "s-1",
                                            "task_type": "qa", "ticket": 42}})
    [row] = engine.usage()
    assert row.user_id == "alice" and row.session_id == "s-1" and row.project == "bot"
    assert row.task_type == "qa"
    assert row.tags == ["prod", "experiment-7"]
    assert row.metadata_ == {"team": "search", "ticket": 42}  # ls_* keys are LangChain's own
    assert engine.usage(tag="experiment-7")[0].id == row.id


def test_nested_chain_rows_share_the_root_run(engine, usage_model):
    first = usage_model(usage=USAGE, reply="Paris")
    second = usage_model(usage=USAGE, model_name="gpt-4o")
    chain = (ChatPromptTemplate.from_template("Capital of {country}?") | first
             | StrOutputParser()
             | RunnableLambda(lambda city: f"Tell me about {city}") | second
             | StrOutputParser())
    handler = BudgetkitCallbackHandler(engine)
    chain.invoke({"country": "France"}, config={"callbacks": [handler]})

    rows = engine.usage()
    assert len(rows) == 2
    assert {row.model for row in rows} == {"gpt-4o-mini", "gpt-4o"}
    roots = {row.root_run_id for row in rows}
    assert len(roots) == 1 and None not in roots
    assert all(row.parent_run_id == row.root_run_id for row in rows)  # children of the chain
    assert all(row.run_id != row.root_run_id for row in rows)
    assert len(engine.usage(root_run_id=roots.pop())) == 2


def test_no_usage_reported_is_estimated_with_the_tokenizer(engine):
    model = GenericFakeChatModel(messages=iter(["Paris is the capital of France."]))
    handler = BudgetkitCallbackHandler(engine)
    model.invoke("Capital of France?", config={"callbacks": [handler],
                                               "metadata": {"ls_model_name": "gpt-4o-mini"}})
    [row] = engine.usage()
    assert row.usage_source == "estimated"
    assert row.input_tokens == engine.count_message_tokens(
        [{"role": "user", "content": "Capital of France?"}], "gpt-4o-mini")
    assert row.output_tokens == engine.count_tokens("Paris is the capital of France.",
                                                    "gpt-4o-mini")
    assert row.cost_nanos == price(engine, "gpt-4o-mini", row.input_tokens, row.output_tokens)
    assert row.cost_nanos > 0


def test_stream_without_usage_counts_streamed_text(engine, usage_model):
    model = usage_model(usage=None, reply="one two three four five")
    handler = BudgetkitCallbackHandler(engine)
    text = "".join(chunk.content for chunk in model.stream("count", config={
        "callbacks": [handler]}))
    [row] = engine.usage()
    assert row.usage_source == "estimated"
    assert row.output_tokens == engine.count_tokens(text, "gpt-4o-mini") == 5


def test_stream_with_usage_uses_the_final_chunk(engine, usage_model):
    model = usage_model(usage=USAGE)
    handler = BudgetkitCallbackHandler(engine)
    list(model.stream("hi", config={"callbacks": [handler]}))
    [row] = engine.usage()
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (1200, 1000, 300)
    assert row.usage_source == "provider"


def test_error_records_an_error_row_without_cost(engine, usage_model):
    model = usage_model(usage=USAGE, fail=True)
    handler = BudgetkitCallbackHandler(engine)
    with pytest.raises(RuntimeError, match="provider exploded"):
        model.invoke("hi", config={"callbacks": [handler]})
    [row] = engine.usage()
    assert row.status == "error" and row.error_type == "RuntimeError"
    assert row.cost_nanos == 0 and row.output_tokens == 0


def test_broken_stream_bills_the_partial_output(engine, usage_model):
    model = usage_model(usage=USAGE, reply="a b c d e f", fail_after_chunks=3)
    handler = BudgetkitCallbackHandler(engine)
    with pytest.raises(RuntimeError, match="stream broke"):
        list(model.stream("hi", config={"callbacks": [handler]}))
    [row] = engine.usage()
    assert row.status == "error" and row.usage_source == "estimated"
    assert row.output_tokens == engine.count_tokens("a b c", "gpt-4o-mini")
    assert row.cost_nanos == price(engine, "gpt-4o-mini", row.input_tokens, row.output_tokens)


def test_budget_stop_propagates_before_the_provider_is_called(engine, usage_model):
    engine.add_budget(Budget(limit=0.000001, scope="user", match="alice",
                             require_approval=False))
    model = usage_model(usage=USAGE)
    handler = BudgetkitCallbackHandler(engine, user_id="alice")
    with pytest.raises(BudgetExceeded, match="stops this call"):
        model.invoke("hi", config={"callbacks": [handler]})
    with pytest.raises(BudgetExceeded):
        asyncio.run(model.ainvoke("hi", config={"callbacks": [handler]}))
    assert model.calls == 0
    assert handler._runs == {} and handler._roots == {}
    assert [row.status for row in engine.usage()] == ["blocked", "blocked"]
    model.invoke("hi", config={"callbacks": [BudgetkitCallbackHandler(engine, user_id="bob")]})
    assert model.calls == 1  # other users are not covered by alice's budget


def test_stream_check_cuts_the_stream(engine, usage_model):
    prompt_tokens = engine.count_message_tokens([{"role": "user", "content": "hi"}],
                                                "gpt-4o-mini")
    # each run may use its prompt and 3 more tokens; the call reserves 2 output tokens
    engine.add_budget(Budget(limit=prompt_tokens + 3, scope="run", period="run",
                             unit="tokens", require_approval=False))
    model = usage_model(usage=USAGE, reply="a b c d e f g h")
    handler = BudgetkitCallbackHandler(engine)
    received = []
    with pytest.raises(BudgetExceeded):
        for chunk in model.stream("hi", config={"callbacks": [handler],
                                                "metadata": {"ls_max_tokens": 2}}):
            received.append(chunk.content)
    [row] = engine.usage()
    assert row.status == "error" and row.error_type == "BudgetExceeded"
    assert received == ["a", " b", " c"]
    assert row.output_tokens == 4  # every token generated before the cut is billed


@pytest.mark.parametrize("with_budget", [False, True])
def test_budgetkit_cache_hit_is_discarded_not_recorded(engine, with_budget):
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, LLMResult

    if with_budget:  # the run is admitted at its start: the hit returns its reservation
        engine.add_budget(Budget(name="day", limit=5.0))
    handler = BudgetkitCallbackHandler(engine)
    run_id = __import__("uuid").uuid4()
    handler.on_chat_model_start({}, [[]], run_id=run_id,
                                metadata={"ls_model_name": "gpt-4o-mini"})
    ticket = handler._runs[run_id].ticket
    assert (ticket is not None) is with_budget
    hit = AIMessage(content="cached", usage_metadata=USAGE,
                    response_metadata={"budgetkit_cache_hit": True})
    handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=hit)]]), run_id=run_id)
    assert engine.usage() == [] and handler.calls == 0
    if with_budget:
        assert ticket.done
        engine.flush()
        assert engine.budget_status("day")[0].reserved == 0


def test_langchain_cache_hit_is_a_cached_row_with_money_saved(engine, usage_model):
    model = usage_model(usage=USAGE, cache=InMemoryCache())
    handler = BudgetkitCallbackHandler(engine)
    model.invoke("same question", config={"callbacks": [handler]})
    model.invoke("same question", config={"callbacks": [handler]})
    assert model.calls == 1
    first, second = engine.usage()
    assert first.status == "ok" and first.cost_nanos > 0
    assert second.status == "cached" and second.cost_nanos == 0
    assert second.saved_nanos == first.cost_nanos


def test_unknown_model_never_breaks_the_call_nor_records_zero(engine, usage_model, caplog):
    model = usage_model(usage=USAGE, model_name="my-private-model")
    handler = BudgetkitCallbackHandler(engine)
    with caplog.at_level(logging.WARNING, logger="budgetkit"):
        for _ in range(3):
            assert model.invoke("hi", config={"callbacks": [handler]}).content
    assert engine.usage() == []
    warnings = [r for r in caplog.records if "my-private-model" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per call


def test_unknown_model_uses_the_fallback_price_when_configured(tmp_path, usage_model):
    with Engine(db=str(tmp_path / "f.db")) as engine:
        engine.catalog.fallback = "gpt-4o"
        model = usage_model(usage=USAGE, model_name="my-private-model")
        model.invoke("hi", config={"callbacks": [BudgetkitCallbackHandler(engine)]})
        [row] = engine.usage()
        assert row.model == "my-private-model"
        assert row.cost_nanos == price(engine, "gpt-4o", 1200, 300, cached_input_tokens=1000)


def test_strict_models_raises_for_unknown_models(engine, usage_model):
    model = usage_model(usage=USAGE, model_name="my-private-model")
    with pytest.raises(UnknownModelError):
        model.invoke("hi", config={"callbacks": [BudgetkitCallbackHandler(
            engine, strict_models=True)]})
    assert model.calls == 0


def test_get_budgetkit_callback_totals_the_block(engine, usage_model):
    model = usage_model(usage=USAGE)
    with get_budgetkit_callback(engine, user_id="bob") as cb:
        model.invoke("one")
        model.invoke("two")
    model.invoke("outside the block")
    assert cb.calls == 2 and cb.total_tokens == 3000
    assert cb.cost_nanos == 2 * price(engine, "gpt-4o-mini", 1200, 300,
                                      cached_input_tokens=1000)
    assert cb.usage_by_model["gpt-4o-mini"]["calls"] == 2
    assert [row.user_id for row in engine.usage()] == ["bob", "bob"]


async def test_async_handler_records_ainvoke_and_astream(engine, usage_model):
    model = usage_model(usage=USAGE)
    handler = AsyncBudgetkitCallbackHandler(engine, project="async-app")
    await model.ainvoke("hi", config={"callbacks": [handler]})
    async for _ in model.astream("hi", config={"callbacks": [handler]}):
        pass
    rows = engine.usage()
    assert len(rows) == 2 and all(row.project == "async-app" for row in rows)
    assert all(row.input_tokens == 1200 for row in rows)


def test_batch_across_threads_records_one_row_per_call(engine, usage_model):
    model = usage_model(usage=USAGE)
    handler = BudgetkitCallbackHandler(engine)
    model.batch([f"q{i}" for i in range(40)], config={"callbacks": [handler],
                                                       "max_concurrency": 8})
    rows = engine.usage()
    assert len(rows) == 40 and len({row.run_id for row in rows}) == 40
    assert handler.calls == 40 and handler._runs == {}


@pytest.mark.parametrize("usage, expected", [
    ({"input_tokens": 100, "output_tokens": 50,
      "input_token_details": {"priority_cache_read": 60},
      "output_token_details": {"priority_reasoning": 20, "priority": 30}},
     (100, 50, 60, 0, 20)),
    ({"input_tokens": 100, "output_tokens": 50,
      "input_token_details": {"flex_cache_read": 10},
      "output_token_details": {"flex_reasoning": 5}},
     (100, 50, 10, 0, 5)),
    # Anthropic: the ephemeral split replaces cache_creation; writes are counted once
    ({"input_tokens": 1000, "output_tokens": 10,
      "input_token_details": {"cache_read": 100, "cache_creation": 0,
                              "ephemeral_5m_input_tokens": 300,
                              "ephemeral_1h_input_tokens": 200}},
     (1000, 10, 100, 500, 0)),
    ({"input_tokens": 1000, "output_tokens": 10,
      "input_token_details": {"cache_read": 100, "cache_creation": 500,
                              "ephemeral_5m_input_tokens": 500}},
     (1000, 10, 100, 500, 0)),
    # details larger than the total (a provider quirk) are clamped, never negative
    ({"input_tokens": 10, "output_tokens": 5, "input_token_details": {"cache_read": 50},
      "output_token_details": {"reasoning": 9}},
     (10, 5, 10, 0, 5)),
])
def test_usage_metadata_keys(usage, expected):
    got = usage_from_metadata(usage)
    assert got is not None
    assert (got.input_tokens, got.output_tokens, got.cached_input_tokens,
            got.cache_write_tokens, got.reasoning_tokens) == expected


def test_zero_usage_means_not_reported():
    assert usage_from_metadata({"input_tokens": 0, "output_tokens": 0,
                                "total_tokens": 0}) is None
    assert usage_from_metadata(None) is None


def test_handler_operation_type_default_and_metadata_override(engine, usage_model):
    model = usage_model(usage=USAGE)
    handler = BudgetkitCallbackHandler(engine, operation_type="rag_output")
    model.invoke("answer from context", config={"callbacks": [handler]})
    model.invoke("classify", config={"callbacks": [handler], "metadata": {
        "operation_type": "text_classification"}})
    assert [row.operation_type for row in engine.usage()] == ["rag_output",
                                                              "text_classification"]


def test_calls_recorded_elsewhere_are_skipped(engine, usage_model):
    from budgetkit.routing import metered_call

    handler = BudgetkitCallbackHandler(engine)
    model = usage_model(usage=USAGE)
    model.invoke("metered by a wrapper", config={"callbacks": [handler],
                                                 "metadata": {"budgetkit_metered": True}})
    with metered_call():
        model.invoke("inside a metered call", config={"callbacks": [handler]})
    usage_model(usage=USAGE, response_model=None).invoke("wrapper run", config={
        "callbacks": [handler], "metadata": {"budgetkit_routed": True}})
    assert engine.usage() == [] and handler._runs == {} and handler._roots == {}
    model.invoke("a plain call", config={"callbacks": [handler]})
    assert len(engine.usage()) == 1


async def test_cancelled_call_is_an_error_row_without_cost(engine, usage_model):
    started = asyncio.Event()

    class HangingModel(usage_model):  # type: ignore[misc, valid-type]
        async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
            started.set()
            await asyncio.Event().wait()  # never answers

    handler = BudgetkitCallbackHandler(engine)
    task = asyncio.create_task(HangingModel(usage=USAGE).ainvoke(
        "hi", config={"callbacks": [handler]}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # LangChain reports the cancellation from a shielded task that may finish just after
    # the caller sees CancelledError: wait for it (a synchronisation wait, not a timing).
    for _ in range(500):
        if not handler._runs:
            break
        await asyncio.sleep(0.01)
    [row] = engine.usage()
    assert row.status == "error" and row.error_type == "CancelledError"
    assert row.cost_nanos == 0 and handler._runs == {}


def test_metered_embeddings_budget_stop_and_errors(engine):
    from langchain_core.embeddings import DeterministicFakeEmbedding

    from langchain_budgetkit import MeteredEmbeddings

    class FailingEmbedding(DeterministicFakeEmbedding):
        def embed_query(self, text: str) -> list[float]:
            raise ConnectionError("embedding service down")

    metered = MeteredEmbeddings(FailingEmbedding(size=4), engine,
                                model="text-embedding-3-small", project="search")
    assert len(metered.embed_documents(["one doc", "two docs"])[0]) == 4
    with pytest.raises(ConnectionError):
        metered.embed_query("q")
    engine.add_budget(Budget(limit=0.000001, require_approval=False))
    with pytest.raises(BudgetExceeded):
        metered.embed_documents(["a long document " * 50])
    ok, failed, blocked = engine.usage()
    assert (ok.operation_type, ok.status, ok.project) == ("embedding", "ok", "search")
    assert ok.input_tokens == sum(engine.count_tokens(t, "text-embedding-3-small")
                                  for t in ["one doc", "two docs"])
    assert ok.usage_source == "estimated"
    assert (failed.operation_type, failed.status, failed.cost_nanos) == (
        "query_embedding", "error", 0)
    assert blocked.status == "blocked"


def test_metered_embeddings_needs_a_priced_model(engine):
    from langchain_core.embeddings import DeterministicFakeEmbedding

    from budgetkit import ConfigurationError
    from langchain_budgetkit import MeteredEmbeddings

    with pytest.raises(ConfigurationError, match="pass model="):
        MeteredEmbeddings(DeterministicFakeEmbedding(size=4), engine)
    with pytest.raises(UnknownModelError, match="acme-embed"):
        MeteredEmbeddings(DeterministicFakeEmbedding(size=4), engine, model="acme-embed")


# ---------------------------------------------------------------------------- deferred bookkeeping

def test_row_keeps_the_calls_own_time_and_latency_though_written_later(engine, usage_model):
    import time

    class Slow(usage_model):  # type: ignore[misc, valid-type]
        def _generate(self, *args, **kwargs):
            time.sleep(0.05)
            return super()._generate(*args, **kwargs)

    handler = BudgetkitCallbackHandler(engine)
    engine._writer._prepare = None  # hold the bookkeeping back until the flush below
    before = engine.now()
    Slow(usage=USAGE).invoke("hi", config={"callbacks": [handler]})
    after = engine.now()
    assert len(engine._deferred) == 1  # nothing was priced or built on the caller's thread
    time.sleep(0.2)
    (row,) = engine.usage()
    assert before <= row.created_at <= after
    assert 50 <= row.latency_ms < 200


def test_reading_a_total_finishes_calls_that_ended(engine, usage_model):
    handler = BudgetkitCallbackHandler(engine)
    engine._writer._prepare = None  # only the read below can run the bookkeeping
    usage_model(usage=USAGE).invoke("hi", config={"callbacks": [handler]})
    assert handler.calls == 1 and handler.input_tokens == USAGE["input_tokens"]
    assert handler.cost > 0 and not engine._deferred


def test_a_later_cache_hit_of_the_same_generation_leaves_the_first_call_paid(engine, usage_model):
    handler = BudgetkitCallbackHandler(engine)
    engine._writer._prepare = None  # the hit replaces the shared generation's message first
    model = usage_model(usage=USAGE, cache=InMemoryCache())
    model.invoke("same question", config={"callbacks": [handler]})
    model.invoke("same question", config={"callbacks": [handler]})
    statuses = [row.status for row in engine.usage()]
    assert statuses == ["ok", "cached"]


def test_bound_tools_are_part_of_the_admitted_prompt(engine):
    from langchain_core.messages import HumanMessage
    from langchain_core.utils.function_calling import convert_to_openai_tool

    def get_weather(city: str, unit: str = "celsius") -> str:
        """Look up today's weather for a city."""
        return "sunny"

    tools = [convert_to_openai_tool(get_weather)]
    engine.add_budget(Budget(name="day", limit=5.0))  # admitted at the start: counted
    handler = BudgetkitCallbackHandler(engine)
    run_id = __import__("uuid").uuid4()
    handler.on_chat_model_start({}, [[HumanMessage("Weather in Paris?")]], run_id=run_id,
                                metadata={"ls_model_name": "gpt-4o"},
                                invocation_params={"model": "gpt-4o", "tools": tools})
    ticket = handler._runs[run_id].ticket
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = engine.count_message_tokens(messages, "gpt-4o", tools=tools)
    assert with_tools > engine.count_message_tokens(messages, "gpt-4o")
    assert ticket.input_tokens == with_tools
    assert ticket.input_bound is None or ticket.input_bound >= with_tools
