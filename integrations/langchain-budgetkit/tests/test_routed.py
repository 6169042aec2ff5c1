"""RoutedChatModel: routing, cascade, fallback, streaming, callbacks, tools, structured output."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel

from budgetkit import (Budget, BudgetExceeded, Cascade, ConfigurationError, Engine, Fallback,
                       MinLength, Router)
from langchain_budgetkit import RoutedChatModel
from langchain_budgetkit._routed import METERED_MARKER, ROUTED_MARKER

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"
USAGE = {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}


class ToolFakeChat(FakeMessagesListChatModel):
    """FakeMessagesListChatModel plus bind_tools (no langchain fake implements it)."""

    bound: list[Any] = []

    def bind_tools(self, tools, **kwargs):
        self.bound.append((tools, kwargs))
        return self.bind(tools=tools, **kwargs)


def fake(*replies: str | AIMessage) -> ToolFakeChat:
    return ToolFakeChat(bound=[], responses=[
        r if isinstance(r, AIMessage) else AIMessage(content=r, usage_metadata=USAGE)
        for r in replies])


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []
        self.tokens: list[UUID] = []

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None,
                            metadata=None, **kwargs):
        self.starts.append({"run_id": run_id, "parent_run_id": parent_run_id,
                            "metadata": dict(metadata or {})})

    def on_llm_new_token(self, token, *, run_id, **kwargs):
        self.tokens.append(run_id)


def routed(cheap=None, strong=None, **kwargs) -> RoutedChatModel:
    cheap = cheap or fake("cheap answer")
    strong = strong or fake("strong answer")
    kwargs.setdefault("router", Router({"low": CHEAP, "high": STRONG}))
    return RoutedChatModel(models={CHEAP: cheap, STRONG: strong}, **kwargs)


class RateLimitError(Exception):
    status_code = 429


class FailingChat(FakeMessagesListChatModel):
    calls: int = 0

    def _generate(self, *args, **kwargs):
        self.calls += 1
        raise RateLimitError("slow down")


# ----------------------------------------------------------------------------- routing

def test_router_picks_per_call_and_marks_the_answer(engine: Engine) -> None:
    cheap, strong = fake("cheap answer"), fake("strong answer")
    model = routed(cheap, strong, engine=engine)
    simple = model.invoke("What is 2 + 2?")
    hard = model.invoke("Review this", task_type="code_review")
    assert simple.content == "cheap answer" and hard.content == "strong answer"
    marker = hard.response_metadata[ROUTED_MARKER]
    assert marker["model"] == STRONG and "task type code_review" in marker["route_reason"]
    rows = {row.model: row for row in engine.usage()}
    assert set(rows) == {CHEAP, STRONG}
    assert rows[STRONG].route_reason.startswith("task type code_review")
    assert rows[STRONG].attempt == 1 and rows[STRONG].request_id == marker["request_id"]
    assert (rows[CHEAP].input_tokens, rows[CHEAP].output_tokens) == (11, 7)
    assert rows[CHEAP].usage_source == "provider"


def test_task_type_and_user_from_run_metadata(engine: Engine) -> None:
    model = routed(engine=engine)
    out = model.invoke("x", config={"metadata": {"task_type": "architecture_design",
                                                 "user_id": "alice"}})
    assert out.content == "strong answer"
    (row,) = engine.usage()
    assert row.user_id == "alice" and row.task_type == "architecture_design"


def test_required_model_and_default_model() -> None:
    model = routed()
    assert model.invoke("hi", model=STRONG).content == "strong answer"
    with pytest.raises(ConfigurationError, match="not one of the routed models"):
        model.invoke("hi", model="gpt-4.1")
    plain = RoutedChatModel(models={CHEAP: fake("a"), STRONG: fake("b")}, default_model=STRONG)
    assert plain.invoke("hi").content == "b"


def test_configuration_errors_name_the_problem() -> None:
    with pytest.raises(ConfigurationError, match="gpt-4.1"):
        RoutedChatModel(models={CHEAP: fake("a")}, router=Router({"low": CHEAP, "high": "gpt-4.1"}))
    with pytest.raises(ConfigurationError, match="needs models"):
        RoutedChatModel(models={})


# ----------------------------------------------------------------------------- cascade

def test_cascade_escalates_and_records_each_attempt(engine: Engine) -> None:
    model = RoutedChatModel(models={CHEAP: fake("no"), STRONG: fake("a long and useful answer")},
                            cascade=Cascade([CHEAP, STRONG], [MinLength(10)]), engine=engine)
    out = model.invoke("explain")
    assert out.content == "a long and useful answer"
    marker = out.response_metadata[ROUTED_MARKER]
    assert marker["attempts"] == 2 and marker["model"] == STRONG
    rows = sorted(engine.usage(request_id=marker["request_id"]), key=lambda r: r.attempt)
    assert [(r.model, r.attempt) for r in rows] == [(CHEAP, 1), (STRONG, 2)]
    assert "too short" in rows[1].route_reason


def test_cascade_accepts_the_cheap_answer_when_it_passes(engine: Engine) -> None:
    strong = fake("unused")
    model = RoutedChatModel(models={CHEAP: fake("long enough answer"), STRONG: strong},
                            cascade=Cascade([CHEAP, STRONG], [MinLength(5)]), engine=engine)
    assert model.invoke("q").content == "long enough answer"
    assert strong.i == 0 and len(engine.usage()) == 1


# ---------------------------------------------------------------------------- fallback

def test_fallback_on_rate_limit_records_the_failed_attempt(engine: Engine) -> None:
    failing = FailingChat(responses=[AIMessage(content="never")])
    model = routed(failing, fake("strong answer"), engine=engine,
                   fallback=Fallback([CHEAP, STRONG], max_retries=1, sleep=lambda s: None))
    out = model.invoke("hi")
    assert out.content == "strong answer" and failing.calls == 2
    rows = sorted(engine.usage(), key=lambda r: r.attempt)
    assert [(r.model, r.status, r.attempt) for r in rows] == [
        (CHEAP, "error", 1), (CHEAP, "error", 2), (STRONG, "ok", 3)]
    assert "fallback from gpt-4o-mini to gpt-4o" in rows[2].route_reason


def test_budget_stop_is_not_fallen_back(engine: Engine) -> None:
    engine.add_budget(Budget(limit=0.000001, name="cheap-cap", scope="model", match=CHEAP,
                             require_approval=False))
    strong = fake("strong answer")
    model = routed(fake("cheap"), strong, engine=engine,
                   fallback=Fallback([CHEAP, STRONG], sleep=lambda s: None))
    with pytest.raises(BudgetExceeded):
        model.invoke("hi")
    assert strong.i == 0


# ---------------------------------------------------------------------------- callbacks

def test_inner_runs_reach_handlers_as_children_with_markers(engine: Engine) -> None:
    recorder = Recorder()
    model = routed(engine=engine)
    model.invoke("hi", config={"callbacks": [recorder], "metadata": {"user_id": "bob"}})
    wrapper, inner = recorder.starts
    assert inner["parent_run_id"] == wrapper["run_id"]
    assert wrapper["metadata"][ROUTED_MARKER] is True
    assert ROUTED_MARKER not in inner["metadata"]
    assert inner["metadata"][METERED_MARKER] is True
    assert inner["metadata"]["route_reason"].startswith("score ")
    assert inner["metadata"]["user_id"] == "bob"
    assert inner["metadata"]["ls_model_name"] == CHEAP  # the fake names no model itself


def test_without_engine_inner_runs_are_left_to_the_tracker() -> None:
    recorder = Recorder()
    routed().invoke("hi", config={"callbacks": [recorder]})
    assert METERED_MARKER not in recorder.starts[1]["metadata"]


# ---------------------------------------------------------------------------- streaming

def test_stream_comes_from_the_chosen_model_and_is_settled(engine: Engine, usage_model) -> None:
    cheap = usage_model(reply="one two three", usage=USAGE, model_name=CHEAP)
    recorder = Recorder()
    model = routed(cheap, usage_model(reply="strong", model_name=STRONG), engine=engine)
    chunks = list(model.stream("hi", config={"callbacks": [recorder]}))
    text = "".join(c.content for c in chunks)
    assert text == "one two three"
    assert chunks[0].response_metadata[ROUTED_MARKER]["model"] == CHEAP
    (row,) = engine.usage()
    assert (row.model, row.input_tokens, row.output_tokens, row.status) == (CHEAP, 11, 7, "ok")
    wrapper, inner = recorder.starts  # stream() gives _stream no run manager: we open it
    assert inner["parent_run_id"] == wrapper["run_id"]
    assert wrapper["run_id"] in recorder.tokens and inner["run_id"] in recorder.tokens


def test_astream_inner_run_is_a_child(usage_model) -> None:
    recorder = Recorder()
    model = routed(usage_model(reply="a b", usage=USAGE), usage_model(reply="c"))

    async def go():
        return [c async for c in model.astream("hi", config={"callbacks": [recorder]})]

    assert "".join(c.content for c in asyncio.run(go())) == "a b"
    wrapper, inner = recorder.starts
    assert inner["parent_run_id"] == wrapper["run_id"]


def test_inner_call_knows_it_is_metered(engine: Engine) -> None:
    from budgetkit.routing import is_metered_call

    seen: list[bool] = []

    class Probe(FakeMessagesListChatModel):
        def _generate(self, *args, **kwargs):
            seen.append(is_metered_call())
            return super()._generate(*args, **kwargs)

    probe = Probe(responses=[AIMessage(content="x")])
    routed(probe, engine=engine).invoke("hi")
    routed(probe).invoke("hi")
    assert seen == [True, False] and is_metered_call() is False


def test_stream_falls_back_when_the_first_chunk_fails(engine: Engine, usage_model) -> None:
    broken = usage_model(reply="never", fail_after_chunks=0, model_name=CHEAP)
    model = routed(broken, usage_model(reply="from strong", usage=USAGE, model_name=STRONG),
                   engine=engine, fallback=Fallback([CHEAP, STRONG], max_retries=0,
                                                    fallback_on=(RuntimeError,)))
    assert "".join(c.content for c in model.stream("hi")) == "from strong"
    statuses = sorted((r.model, r.status) for r in engine.usage())
    assert statuses == [(STRONG, "ok"), (CHEAP, "error")]


def test_stream_with_cascade_buffers_cheap_and_streams_the_last(engine: Engine,
                                                                 usage_model) -> None:
    model = RoutedChatModel(
        models={CHEAP: usage_model(reply="no", usage=USAGE, model_name=CHEAP),
                STRONG: usage_model(reply="a b c d e f", usage=USAGE, model_name=STRONG)},
        cascade=Cascade([CHEAP, STRONG], [MinLength(5)]), engine=engine)
    chunks = list(model.stream("hi"))
    assert "".join(c.content for c in chunks) == "a b c d e f" and len(chunks) > 2
    assert sorted(r.attempt for r in engine.usage()) == [1, 2]


def test_async_paths(engine: Engine, usage_model) -> None:
    model = routed(engine=engine)

    async def go():
        one = await model.ainvoke("hi")
        many = await model.abatch(["a", "b"])
        pieces = [c async for c in routed(usage_model(reply="x y", usage=USAGE),
                                          engine=engine).astream("hi")]
        return one, many, pieces

    one, many, pieces = asyncio.run(go())
    assert one.content == "cheap answer" and [m.content for m in many] == ["cheap answer"] * 2
    assert "".join(p.content for p in pieces) == "x y"
    assert len(engine.usage()) == 4


def test_batch_routes_each_input(engine: Engine) -> None:
    model = routed(engine=engine)
    outs = model.batch(["hi", "Review this code"],
                       config=[{}, {"metadata": {"task_type": "code_review"}}])
    assert [o.content for o in outs] == ["cheap answer", "strong answer"]


# ---------------------------------------------------------------- tools, structured output

class Person(BaseModel):
    name: str
    age: int


def tool_reply(args: dict) -> AIMessage:
    return AIMessage(content="", usage_metadata=USAGE,
                     tool_calls=[{"name": "Person", "args": args, "id": "call-1"}])


def test_bind_tools_passes_through_to_the_chosen_model() -> None:
    strong = fake(tool_reply({"name": "Ada", "age": 36}))
    model = routed(fake("cheap"), strong).bind_tools([Person], tool_choice="any")
    out = model.invoke("extract", task_type="code_review")
    assert out.tool_calls[0]["args"] == {"name": "Ada", "age": 36}
    (tools, kwargs), = strong.bound
    assert tools[0]["function"]["name"] == "Person" and kwargs == {"tool_choice": "any"}


def test_with_structured_output_uses_the_chosen_models_parser() -> None:
    model = routed(fake(tool_reply({"name": "Ada", "age": 36})), fake("unused"))
    assert model.with_structured_output(Person).invoke("Ada is 36") == Person(name="Ada", age=36)
    raw = routed(fake(tool_reply({"name": "Ada", "age": 36})), fake("unused")) \
        .with_structured_output(Person, include_raw=True).invoke("x")
    assert raw["parsed"] == Person(name="Ada", age=36) and raw["parsing_error"] is None
    assert isinstance(raw["raw"], AIMessage)


def test_structured_cascade_escalates_when_parsing_fails(engine: Engine) -> None:
    model = RoutedChatModel(
        models={CHEAP: fake(tool_reply({"name": "Ada"})),
                STRONG: fake(tool_reply({"name": "Ada", "age": 36}))},
        cascade=Cascade([CHEAP, STRONG]), engine=engine)
    assert model.with_structured_output(Person).invoke("x") == Person(name="Ada", age=36)
    rows = sorted(engine.usage(), key=lambda r: r.attempt)
    assert [r.model for r in rows] == [CHEAP, STRONG]
    assert "did not parse" in rows[1].route_reason


def test_messages_input_and_system_prompt_route_on_the_whole_conversation() -> None:
    model = routed(router=Router({"low": CHEAP, "high": STRONG},
                                 complexity_thresholds=(0.1, 0.1)))
    out = model.invoke([HumanMessage("Explain why, step by step, and compare the trade-offs")])
    assert out.content == "strong answer"
