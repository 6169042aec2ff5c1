"""BudgetkitCache: LangChain's standard cache suites, chat hits, markers and ledger rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.caches import BaseCache
from langchain_core.embeddings import Embeddings
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import AsyncCacheTestSuite, SyncCacheTestSuite

from budgetkit import ConfigurationError, Engine
from budgetkit.cache import MiniLMEmbedder
from budgetkit.testing import PgvectorServer
from langchain_budgetkit import BudgetkitCallbackHandler
from langchain_budgetkit._cache import CACHE_HIT_MARK, BudgetkitCache, model_from_llm_string

USAGE = {"input_tokens": 1200, "output_tokens": 300, "total_tokens": 1500}


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()


class MiniLMEmbeddings(Embeddings):
    """A LangChain ``Embeddings`` over the local model (what users pass as ``embeddings=``)."""

    def __init__(self, model: MiniLMEmbedder) -> None:
        self.model = model
        self.calls = 0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        return self.model(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class TestBudgetkitCacheSync(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self, tmp_path: Path) -> Iterator[BaseCache]:
        with Engine(tmp_path / "sync.db") as engine:
            yield BudgetkitCache(engine)


class TestBudgetkitCacheAsync(AsyncCacheTestSuite):
    @pytest.fixture
    async def cache(self, tmp_path: Path) -> Iterator[BaseCache]:
        with Engine(tmp_path / "async.db") as engine:
            yield BudgetkitCache(engine)


@pytest.fixture(scope="module")
def pgvector_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgvectorServer]:
    pytest.importorskip("pgserver", reason="pgserver (PostgreSQL 16 + pgvector) not installed")
    server = PgvectorServer(tmp_path_factory.mktemp("pg"))
    try:
        server.start()
    except ConfigurationError as exc:
        pytest.skip(f"pgserver could not start PostgreSQL with pgvector here: {exc}")
    yield server
    server.stop()


class TestBudgetkitCacheSyncPgvector(SyncCacheTestSuite):
    """The same suite with the vectors and entries in PostgreSQL (pgvector backend)."""

    @pytest.fixture
    def cache(self, pgvector_server: PgvectorServer,
              minilm: MiniLMEmbedder) -> Iterator[BaseCache]:
        with Engine(pgvector_server.new_database()) as engine:
            yield BudgetkitCache(engine, embeddings=MiniLMEmbeddings(minilm),
                                 vector_backend="pgvector")


class TestBudgetkitCacheAsyncPgvector(AsyncCacheTestSuite):
    @pytest.fixture
    async def cache(self, pgvector_server: PgvectorServer,
                    minilm: MiniLMEmbedder) -> Iterator[BaseCache]:
        with Engine(pgvector_server.new_database()) as engine:
            yield BudgetkitCache(engine, embeddings=MiniLMEmbeddings(minilm),
                                 vector_backend="pgvector")


def test_chat_hit_is_marked_recorded_once_and_not_double_counted(
        engine: Engine, usage_model: Any) -> None:
    handler = BudgetkitCallbackHandler(engine)
    model = usage_model(usage=USAGE, cache=BudgetkitCache(engine, namespace="acme"))
    first = model.invoke("What is the capital of France?", config={"callbacks": [handler]})
    second = model.invoke("What is the capital of France?", config={"callbacks": [handler]})
    assert model.calls == 1  # the second answer came from the cache
    assert second.content == first.content
    assert second.response_metadata[CACHE_HIT_MARK] is True
    assert second.response_metadata["budgetkit_cache"] == "exact"
    assert CACHE_HIT_MARK not in first.response_metadata
    rows = engine.usage()
    assert sorted(row.status for row in rows) == ["cached", "ok"]
    ok = next(row for row in rows if row.status == "ok")
    cached = next(row for row in rows if row.status == "cached")
    assert cached.cost_nanos == 0
    assert cached.saved_nanos == ok.cost_nanos > 0  # it saved exactly what the call cost


@pytest.mark.parametrize("use_async", [False, True])
async def test_a_hit_row_is_attributed_to_the_run_that_asked(
        engine: Engine, usage_model: Any, use_async: bool) -> None:
    handler = BudgetkitCallbackHandler(engine, project="shop")
    model = usage_model(usage=USAGE, cache=BudgetkitCache(engine))
    model.invoke("What are the opening hours of the Leeds store?", config={"callbacks": [handler],
                                                "metadata": {"user_id": "ana"}})
    config = {"callbacks": [handler], "metadata": {"user_id": "bob", "session_id": "s9"},
              "tags": ["mobile"]}
    if use_async:
        await model.ainvoke("What are the opening hours of the Leeds store?", config=config)
    else:
        model.invoke("What are the opening hours of the Leeds store?", config=config)
    hit = engine.usage(status="cached")
    assert len(hit) == 1
    assert (hit[0].user_id, hit[0].session_id, hit[0].project) == ("bob", "s9", "shop")
    assert hit[0].run_id and hit[0].run_id == hit[0].root_run_id
    assert "mobile" in hit[0].tags
    # Outside any handler's run the cache records the hit without attribution.
    model.invoke("What are the opening hours of the Leeds store?")
    assert [row.user_id for row in engine.usage(status="cached")] == ["bob", None]


@pytest.mark.parametrize("use_async", [False, True])
async def test_a_personal_question_is_never_served_to_another_user(
        engine: Engine, usage_model: Any, use_async: bool) -> None:
    """The users come from the runs' metadata, through budgetkit's callback handler."""
    handler = BudgetkitCallbackHandler(engine)
    model = usage_model(usage=USAGE, cache=BudgetkitCache(engine))

    async def ask(user: str) -> Any:
        config = {"callbacks": [handler], "metadata": {"user_id": user}}
        if use_async:
            return await model.ainvoke("Where is my order?", config=config)
        return model.invoke("Where is my order?", config=config)

    await ask("ana")
    bob = await ask("bob")
    assert model.calls == 2 and CACHE_HIT_MARK not in bob.response_metadata
    again = await ask("ana")
    assert model.calls == 2 and again.response_metadata[CACHE_HIT_MARK] is True
    assert [row.user_id for row in engine.usage(status="cached")] == ["ana"]


def test_nothing_is_shared_across_namespaces_models_or_parameters(
        engine: Engine, usage_model: Any) -> None:
    class NamedModel(usage_model):  # type: ignore[misc,valid-type]
        @property
        def _identifying_params(self) -> dict[str, Any]:
            return {"model_name": self.model_name}  # as provider models put it in llm_string

    usage_model = NamedModel
    tenant_a = BudgetkitCache(engine, namespace="a")
    tenant_b = BudgetkitCache(engine, namespace="b")
    usage_model(cache=tenant_a).invoke("hello")
    for model in (usage_model(cache=tenant_b), usage_model(cache=tenant_a, model_name="gpt-4o")):
        model.invoke("hello")
        assert model.calls == 1
    hotter = usage_model(cache=tenant_a)
    hotter.invoke("hello", stop=["\n"])
    assert hotter.calls == 1


def test_semantic_hit_with_langchain_embeddings_keeps_the_conversation(
        engine: Engine, usage_model: Any, minilm: MiniLMEmbedder) -> None:
    embeddings = MiniLMEmbeddings(minilm)
    cache = BudgetkitCache(engine, embeddings=embeddings)
    model = usage_model(cache=cache, reply="Paris.")
    system = SystemMessage("You answer geography questions.")
    model.invoke([system, HumanMessage("What is the capital of France?")])
    hit = model.invoke([system, HumanMessage("Which city is the capital of France?")])
    assert model.calls == 1 and embeddings.calls > 0
    assert hit.response_metadata["budgetkit_cache"] == "semantic"
    # the guard: a different country is a different question
    model.invoke([system, HumanMessage("What is the capital of Germany?")])
    assert model.calls == 2
    # the same last message after a different conversation is a different question
    other = [system, HumanMessage("I live in Spain."), AIMessage("Nice!"),
             HumanMessage("What is the capital of France?")]
    model.invoke(other)
    assert model.calls == 3


def test_model_name_is_read_from_the_llm_string() -> None:
    assert model_from_llm_string("[('_type', 'x'), ('model_name', 'gpt-4o-mini')]") == "gpt-4o-mini"
    assert model_from_llm_string('{"kwargs": {"model": "gpt-4o"}}---[]') == "gpt-4o"
    assert model_from_llm_string("Sample LLM string configuration.") is None
