"""Run ids of LlamaIndex rows: every LLM and embedding row of one query, chat turn or agent
run shares one ``root_run_id`` (its outermost span / trace), distinct from the next one's,
on the instrumentation path and on the legacy ``CallbackManager`` path."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from budgetkit import Engine
from llama_index.callbacks.budgetkit import BudgetkitCallbackHandler, BudgetkitEventHandler
from llama_index.callbacks.budgetkit._runs import RUN_ID_MAX, SpanTree, stored_run_id

DOCUMENTS = [Document(text="Paris is the capital of France. It lies on the Seine."),
             Document(text="Berlin is the capital of Germany. It lies on the Spree.")]


@pytest.fixture
def legacy_settings() -> Iterator[None]:
    """``Settings.callback_manager`` restored after the test (the legacy path reads it)."""
    saved = Settings._callback_manager
    try:
        yield
    finally:
        Settings._callback_manager = saved


def use_handler(path: str, engine: Engine, root_dispatcher: Any) -> None:
    if path == "events":
        BudgetkitEventHandler(engine).register(root_dispatcher)
    else:  # the documented legacy wiring: one CallbackManager in Settings
        Settings.callback_manager = CallbackManager([BudgetkitCallbackHandler(engine)])


def group_by_root(rows: list[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for row in rows:
        assert row.root_run_id, f"row {row.operation_type} has no root run id"
        groups.setdefault(row.root_run_id, []).append(row)
    return groups


def assert_one_run(rows: list[Any]) -> str:
    """All ``rows`` share a root, each has its own run id and a parent that is not itself."""
    [root] = {row.root_run_id for row in rows}
    assert len({row.run_id for row in rows}) == len(rows)
    for row in rows:
        assert row.run_id != root and row.parent_run_id not in (None, row.run_id)
        assert max(len(row.run_id), len(row.parent_run_id), len(root)) <= RUN_ID_MAX
    return root


@pytest.mark.parametrize("path", ["events", "legacy"])
def test_query_engine_rows_share_the_query_root(engine, mocks, root_dispatcher,
                                                legacy_settings, path):
    use_handler(path, engine, root_dispatcher)
    index = VectorStoreIndex.from_documents(DOCUMENTS, embed_model=mocks.Embedding(embed_dim=8))
    built = len(engine.usage())
    query_engine = index.as_query_engine(llm=mocks.LLM())
    query_engine.query("What is the capital of France?")
    first = engine.usage()[built:]
    query_engine.query("Which river runs through Berlin?")
    second = engine.usage()[built + len(first):]

    for rows in (first, second):  # the query embedding and the answer's LLM call
        assert sorted(row.operation_type for row in rows) == ["query_embedding",
                                                              "text_generation"]
    first_root, second_root = assert_one_run(first), assert_one_run(second)
    assert first_root != second_root
    assert not {first_root, second_root} & {row.root_run_id for row in engine.usage()[:built]}
    expected = "RetrieverQueryEngine.query-" if path == "events" else "query-"
    assert first_root.startswith(expected) and second_root.startswith(expected)


@pytest.mark.parametrize("path", ["events", "legacy"])
def test_real_openai_clients_query_under_one_root(engine, fake_openai, root_dispatcher,
                                                 legacy_settings, path):
    use_handler(path, engine, root_dispatcher)
    embed_model = OpenAIEmbedding(model="text-embedding-3-small", api_base=fake_openai.base_url,
                                  api_key="test-key", max_retries=0)
    llm = OpenAI(model="gpt-4o-mini", api_base=fake_openai.base_url, api_key="test-key",
                 max_retries=0)
    index = VectorStoreIndex.from_documents(DOCUMENTS, embed_model=embed_model)
    query_engine = index.as_query_engine(llm=llm)
    query_engine.query("What is the capital of France?")
    asyncio.run(query_engine.aquery("Which river runs through Berlin?"))

    build, *queries = group_by_root(engine.usage()).values()
    assert [row.operation_type for row in build] == ["embedding"]
    assert len(queries) == 2
    for rows in queries:
        assert sorted(row.operation_type for row in rows) == ["chat_completion",
                                                              "query_embedding"]
        assert_one_run(rows)
    # the rows are still the server's own counts (run ids changed nothing else)
    assert [row.input_tokens for row in engine.usage()] == [
        usage["prompt_tokens"] for usage in fake_openai.usages]


@pytest.mark.parametrize("path", ["events", "legacy"])
def test_concurrent_async_queries_keep_their_own_roots(engine, mocks, root_dispatcher,
                                                       legacy_settings, path):
    use_handler(path, engine, root_dispatcher)
    index = VectorStoreIndex.from_documents(DOCUMENTS, embed_model=mocks.Embedding(embed_dim=8))
    built = len(engine.usage())
    query_engine = index.as_query_engine(llm=mocks.LLM())

    async def eight_at_once() -> None:
        await asyncio.gather(*(query_engine.aquery(f"Question number {i}?") for i in range(8)))

    asyncio.run(eight_at_once())
    runs = group_by_root(engine.usage()[built:])
    assert len(runs) == 8
    for rows in runs.values():
        assert sorted(row.operation_type for row in rows) == ["query_embedding",
                                                              "text_generation"]
        assert_one_run(rows)


@pytest.mark.parametrize("path", ["events", "legacy"])
def test_chat_engine_turns_are_separate_runs(engine, mocks, root_dispatcher, legacy_settings,
                                             path):
    use_handler(path, engine, root_dispatcher)
    index = VectorStoreIndex.from_documents(DOCUMENTS, embed_model=mocks.Embedding(embed_dim=8))
    built = len(engine.usage())
    chat_engine = index.as_chat_engine(chat_mode="condense_plus_context", llm=mocks.LLM())
    chat_engine.chat("Tell me about Paris.")
    chat_engine.chat("And what about its river?")  # condenses the history first: two LLM calls

    turns = list(group_by_root(engine.usage()[built:]).values())
    assert [len(rows) for rows in turns] == [2, 3]
    for rows in turns:
        assert_one_run(rows)
        assert rows[0].root_run_id.startswith("chat-")


def test_agent_run_rows_share_the_run_root(engine, fake_openai, root_dispatcher):
    from llama_index.core.agent.workflow import ReActAgent

    BudgetkitEventHandler(engine).register(root_dispatcher)
    fake_openai.configure(reply="Thought: I can answer without using any more tools.\n"
                                "Answer: 42")
    agent = ReActAgent(tools=[], llm=OpenAI(model="gpt-4o-mini", api_base=fake_openai.base_url,
                                            api_key="test-key", max_retries=0))

    async def two_runs() -> None:
        for question in ("What is six times seven?", "And forty plus two?"):
            assert "42" in str(await agent.run(question))

    asyncio.run(two_runs())
    first, second = engine.usage()
    assert first.root_run_id.startswith("ReActAgent.run-")
    assert second.root_run_id.startswith("ReActAgent.run-")
    assert first.root_run_id != second.root_run_id
    assert first.parent_run_id != first.root_run_id  # the agent step between them


@pytest.mark.parametrize("path", ["events", "legacy"])
def test_a_direct_call_is_its_own_root(engine, mocks, root_dispatcher, path):
    handler = None
    if path == "events":
        BudgetkitEventHandler(engine).register(root_dispatcher)
    else:
        handler = CallbackManager([BudgetkitCallbackHandler(engine)])
    llm = mocks.LLM(**({"callback_manager": handler} if handler else {}))
    llm.complete("first")
    llm.complete("second")
    first, second = engine.usage()
    assert first.root_run_id != second.root_run_id
    if path == "events":  # the call's span is the outermost span
        assert (first.run_id, first.parent_run_id) == (first.root_run_id, None)
    else:  # the legacy LLM wrapper opens a "completion" trace around the call's event
        assert first.root_run_id.startswith("completion-")
        assert first.parent_run_id == first.root_run_id != first.run_id


def test_handler_added_without_its_span_handler_records_run_id_only(engine, mocks,
                                                                    root_dispatcher):
    root_dispatcher.add_event_handler(BudgetkitEventHandler(engine))
    VectorStoreIndex.from_documents(DOCUMENTS, embed_model=mocks.Embedding(embed_dim=8)
                                    ).as_query_engine(llm=mocks.LLM()).query("Paris?")
    rows = engine.usage()
    assert rows and all(row.run_id and row.root_run_id is None for row in rows)


def test_long_span_ids_fit_the_run_id_columns():
    span = f"OpenAIEmbedding.get_text_embedding_batch-{uuid.uuid4()}"  # 78 characters
    assert stored_run_id(span) == span.split(".", 1)[1]
    very_long = f"A.{'m' * 40}-{uuid.uuid4()}"
    assert stored_run_id(very_long) == very_long[-36:]
    assert stored_run_id("short-id") == "short-id" and stored_run_id(None) is None


def test_span_tree_resolves_roots_and_forgets_closed_spans():
    tree = SpanTree()
    tree.open("query-1", None)
    tree.open("retrieve-1", "query-1")
    tree.open("embed-1", "retrieve-1")
    assert tree.run_ids("embed-1") == ("embed-1", "retrieve-1", "query-1")
    for span in ("embed-1", "retrieve-1"):
        tree.close(span)
    tree.open("late-1", "retrieve-1")  # its parent closed before it opened: best known root
    assert tree.run_ids("late-1").root_run_id == "retrieve-1"
    tree.close("late-1")
    tree.close("query-1")
    assert len(tree) == 0


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    """An engine on a fresh PostgreSQL database (skipped without a server)."""
    base = os.environ.get("BUDGETKIT_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("BUDGETKIT_TEST_POSTGRES_URL is not set")
    psycopg = pytest.importorskip("psycopg")
    name = f"bk_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with Engine(db=base.rsplit("/", 1)[0] + "/" + name) as engine:
            yield engine
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_postgresql_stores_the_run_ids_of_a_query(pg_engine, mocks, root_dispatcher):
    # PostgreSQL enforces the 64-character run id columns that SQLite does not
    BudgetkitEventHandler(pg_engine).register(root_dispatcher)
    index = VectorStoreIndex.from_documents(DOCUMENTS, embed_model=mocks.Embedding(embed_dim=8))
    index.as_query_engine(llm=mocks.LLM()).query("What is the capital of France?")
    rows = pg_engine.usage()
    assert [row.operation_type for row in rows] == ["embedding", "query_embedding",
                                                    "text_generation"]
    assert rows[0].run_id.startswith("get_text_embedding_batch-")
    assert_one_run(rows[1:])
