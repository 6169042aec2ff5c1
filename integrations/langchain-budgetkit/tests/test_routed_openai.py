"""RoutedChatModel over real ChatOpenAI clients and a local OpenAI-compatible server."""

from __future__ import annotations

import asyncio

import pytest
from langchain_openai import ChatOpenAI

from budgetkit import Cascade, Engine, Fallback, MinLength, Router
from langchain_budgetkit import RoutedChatModel

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"


def routed(server, engine: Engine | None, **kwargs) -> RoutedChatModel:
    clients = {name: ChatOpenAI(model=name, base_url=server.base_url, api_key="test-key",
                                max_retries=0, stream_usage=True) for name in (CHEAP, STRONG)}
    kwargs.setdefault("router", Router({"low": CHEAP, "high": STRONG}))
    return RoutedChatModel(models=clients, engine=engine, **kwargs)


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "astream"])
def test_rows_equal_the_server_usage_of_the_chosen_model(engine, fake_openai, mode) -> None:
    fake_openai.configure(cached_tokens=4)
    model = routed(fake_openai, engine)
    kwargs = {"task_type": "code_review"}
    if mode == "invoke":
        text = model.invoke("Review: def f(): pass", **kwargs).content
    elif mode == "ainvoke":
        text = asyncio.run(model.ainvoke("Review: def f(): pass", **kwargs)).content
    elif mode == "stream":
        text = "".join(c.content for c in model.stream("Review: def f(): pass", **kwargs))
    else:
        async def consume() -> str:
            return "".join([c.content async for c in model.astream("Review", **kwargs)])
        text = asyncio.run(consume())
    assert text == fake_openai.reply
    assert [r.body["model"] for r in fake_openai.requests] == [STRONG]
    (row,) = engine.usage()
    (usage,) = fake_openai.usages
    assert (row.model, row.input_tokens, row.output_tokens, row.cached_input_tokens) == (
        STRONG, usage["prompt_tokens"], usage["completion_tokens"], 4)
    assert row.usage_source == "provider" and row.route_reason.startswith("task type")
    assert row.cost_nanos == engine.catalog.get(STRONG).cost_nanos(
        usage["prompt_tokens"], usage["completion_tokens"], cached_input_tokens=4)


def test_rate_limited_model_falls_back_to_the_next(engine, fake_openai) -> None:
    fake_openai.fail_next(429, "Rate limit reached", error_type="rate_limit_error")
    model = routed(fake_openai, engine, fallback=Fallback([CHEAP, STRONG], max_retries=0))
    assert model.invoke("hi").content == fake_openai.reply
    assert [r.body["model"] for r in fake_openai.requests] == [CHEAP, STRONG]
    assert sorted((r.model, r.status) for r in engine.usage()) == [
        (STRONG, "ok"), (CHEAP, "error")]


def test_stream_failing_before_the_first_chunk_falls_back(engine, fake_openai) -> None:
    fake_openai.fail_next(503, "overloaded")
    model = routed(fake_openai, engine, fallback=Fallback([CHEAP, STRONG], max_retries=0))
    assert "".join(c.content for c in model.stream("hi")) == fake_openai.reply
    assert [r.body["model"] for r in fake_openai.requests] == [CHEAP, STRONG]


def test_cascade_over_real_clients(engine, fake_openai) -> None:
    fake_openai.configure(reply=lambda body: "short" if body["model"] == CHEAP
                          else "a complete and long enough answer")
    model = routed(fake_openai, engine, router=None,
                   cascade=Cascade([CHEAP, STRONG], [MinLength(12)]))
    assert model.invoke("hi").content == "a complete and long enough answer"
    rows = sorted(engine.usage(), key=lambda r: r.attempt)
    assert [(r.model, r.attempt) for r in rows] == [(CHEAP, 1), (STRONG, 2)]
    assert [r.output_tokens for r in rows] == [u["completion_tokens"] for u in fake_openai.usages]


@pytest.mark.parametrize("with_engine", [False, True])
def test_tracking_handler_and_routed_model_count_each_call_once(engine, fake_openai,
                                                                with_engine) -> None:
    from langchain_budgetkit import BudgetkitCallbackHandler

    model = routed(fake_openai, engine if with_engine else None)
    model.invoke("hi", config={"callbacks": [BudgetkitCallbackHandler(engine)]})
    assert len(fake_openai.usages) == 1
    assert len(engine.usage()) == 1
