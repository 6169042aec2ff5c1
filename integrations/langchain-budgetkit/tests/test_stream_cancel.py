"""A stream cancelled half-way (the caller's task is cancelled after two chunks) ends in
exactly one usage row and gives its budget hold back: through the callback handler on a
real ChatOpenAI client, and through the routed model. Against budgetkit's fake OpenAI
server, which streams word by word with a delay so the cancel lands mid-stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from langchain_openai import ChatOpenAI

from budgetkit import Budget, Engine, Router
from budgetkit.testing import FakeOpenAIServer
from langchain_budgetkit import BudgetkitCallbackHandler, RoutedChatModel

LONG_REPLY = " ".join(f"word{i}" for i in range(60))
PROMPT = "Tell me a long story."


def client(server: FakeOpenAIServer, model: str = "gpt-4o-mini") -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=server.base_url, api_key="test-key",
                      max_retries=0, stream_usage=True)


async def cancel_after_two_chunks(stream: Callable[[], AsyncIterator[object]]) -> int:
    two_chunks = asyncio.Event()
    received: list[object] = []

    async def consume() -> None:
        async for chunk in stream():
            received.append(chunk)
            if len(received) == 2:
                two_chunks.set()

    task = asyncio.create_task(consume())
    await two_chunks.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return len(received)


async def wait_for_rows(engine: Engine, done: Callable[[], bool] = lambda: True) -> None:
    """The row is written when LangChain reports the cancellation, from a shielded task
    that may finish just after the caller sees CancelledError (a synchronisation wait,
    not a timing)."""
    for _ in range(3000):
        if done() and engine.usage():
            return
        await asyncio.sleep(0.01)


@pytest.fixture
def server() -> FakeOpenAIServer:
    with FakeOpenAIServer(reply=LONG_REPLY, chunk_delay=0.02) as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def budgeted(engine: Engine) -> Engine:
    engine.add_budget(Budget(limit=1.0, name="global-daily"))
    return engine


def test_a_cancelled_handler_stream_records_one_row_and_releases_the_hold(
        budgeted: Engine, server: FakeOpenAIServer) -> None:
    handler = BudgetkitCallbackHandler(budgeted)
    llm = client(server)

    async def scenario() -> int:
        received = await cancel_after_two_chunks(
            lambda: llm.astream(PROMPT, config={"callbacks": [handler]}))
        await wait_for_rows(budgeted, lambda: not handler._runs)
        return received

    assert asyncio.run(scenario()) == 2
    [row] = budgeted.usage()
    assert row.status == "error" and row.error_type == "CancelledError"
    # the prompt was sent, so it is billed; the output is what arrived before the cancel
    assert row.input_tokens == budgeted.count_message_tokens(
        [{"role": "user", "content": PROMPT}], "gpt-4o-mini")
    assert 0 < row.output_tokens < len(LONG_REPLY.split())
    assert row.cost_nanos == budgeted.catalog.get("gpt-4o-mini").cost_nanos(
        row.input_tokens, row.output_tokens)
    [status] = budgeted.budget_status()
    assert status.reserved == 0
    assert status.used == pytest.approx(row.cost_nanos / 1e9)
    assert handler._runs == {}


def test_a_cancelled_routed_stream_records_one_row_and_releases_the_hold(
        budgeted: Engine, server: FakeOpenAIServer) -> None:
    model = RoutedChatModel(models={name: client(server, name)
                                    for name in ("gpt-4o-mini", "gpt-4o")},
                            engine=budgeted,
                            router=Router({"low": "gpt-4o-mini", "high": "gpt-4o"}))

    async def scenario() -> int:
        received = await cancel_after_two_chunks(lambda: model.astream(PROMPT))
        await wait_for_rows(budgeted)
        return received

    assert asyncio.run(scenario()) == 2
    [row] = budgeted.usage()
    assert row.status == "error" and row.error_type == "CancelledError"
    [status] = budgeted.budget_status()
    assert status.reserved == 0
    assert status.used == pytest.approx(row.cost_nanos / 1e9)
    assert server.request_count == 1  # cancelled, not retried on another model
