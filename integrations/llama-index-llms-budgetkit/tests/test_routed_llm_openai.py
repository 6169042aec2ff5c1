"""RoutedLLM over llama-index's real OpenAI client and a local OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.openai import OpenAI

from budgetkit import Engine, Fallback, Router
from budgetkit.testing import FakeOpenAIServer
from llama_index.llms.budgetkit import RoutedLLM

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def engine(tmp_path: Path):
    with Engine(db=str(tmp_path / "usage.db")) as eng:
        yield eng


def routed(server, engine, client_kwargs=None, **kwargs) -> RoutedLLM:
    clients = {name: OpenAI(model=name, api_base=server.base_url, api_key="test-key",
                            max_retries=0, **(client_kwargs or {})) for name in (CHEAP, STRONG)}
    kwargs.setdefault("router", Router({"low": CHEAP, "high": STRONG}))
    return RoutedLLM(models=clients, engine=engine, **kwargs)


@pytest.mark.parametrize("mode", ["chat", "stream_chat"])
def test_rows_equal_the_server_usage(server, engine, mode) -> None:
    stream_usage = {"additional_kwargs": {"stream_options": {"include_usage": True}}}
    llm = routed(server, engine, stream_usage if mode == "stream_chat" else None)
    messages = [ChatMessage(role="user", content="Review: def f(): pass")]
    if mode == "chat":
        text = llm.chat(messages, task_type="code_review").message.content
    else:
        pieces = list(llm.stream_chat(messages, task_type="code_review"))
        text = pieces[-1].message.content
    assert text == server.reply
    assert [r.body["model"] for r in server.requests] == [STRONG]
    (row,) = engine.usage()
    (usage,) = server.usages
    assert (row.model, row.input_tokens, row.output_tokens) == (
        STRONG, usage["prompt_tokens"], usage["completion_tokens"])
    assert row.usage_source == "provider"


def test_rate_limit_falls_back(server, engine) -> None:
    server.fail_next(429, "Rate limit reached", error_type="rate_limit_error")
    llm = routed(server, engine, fallback=Fallback([CHEAP, STRONG], max_retries=0))
    assert llm.complete("hi").text == server.reply
    assert [r.body["model"] for r in server.requests] == [CHEAP, STRONG]


@pytest.fixture
def tracking_handler(engine):
    from llama_index.callbacks.budgetkit import BudgetkitEventHandler
    from llama_index.core.instrumentation import get_dispatcher

    dispatcher = get_dispatcher()
    before = list(dispatcher.event_handlers), list(dispatcher.span_handlers)
    handler = BudgetkitEventHandler(engine).register(dispatcher)
    yield handler
    dispatcher.event_handlers[:], dispatcher.span_handlers[:] = before


def test_tracking_handler_records_the_inner_call_once(server, engine, tracking_handler) -> None:
    llm = routed(server, None)  # no engine on the routed LLM: the handler records
    llm.chat([ChatMessage(role="user", content="hi")])
    (row,) = engine.usage()
    assert row.model == CHEAP and row.input_tokens == server.usages[0]["prompt_tokens"]


def test_tracking_handler_skips_calls_the_routed_llm_metered(server, engine,
                                                             tracking_handler) -> None:
    routed(server, engine).chat([ChatMessage(role="user", content="hi")])
    assert len(engine.usage()) == 1
