"""RoutedChatModel(fit_context=True): a prompt too long for the chosen model is fitted to it.

Two catalog models with small windows keep the histories short: "small-chat" (600 tokens)
and "large-chat" (1,200). Every expected token count is computed here from LangChain's own
``convert_to_openai_messages`` and budgetkit's exact counter, not taken from the fitter.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import (AIMessage, BaseMessage, HumanMessage, SystemMessage,
                                     ToolMessage, convert_to_openai_messages)

from budgetkit import (Cascade, ConfigurationError, ContextWindowExceeded, Engine, MinLength,
                       PriceCatalog, Router, count_message_tokens)
from langchain_budgetkit import RoutedChatModel
from langchain_budgetkit._messages import to_openai_messages
from langchain_budgetkit._routed import ROUTED_MARKER

SMALL, LARGE = "small-chat", "large-chat"
WINDOWS = {SMALL: 600, LARGE: 1200}
RESERVE = 100


class RecordingChat(FakeMessagesListChatModel):
    """Answers like FakeMessagesListChatModel and records every prompt it receives.

    No usage is reported, so rows hold the admitted (estimated) input count: the count of
    what this model was actually sent.
    """

    received: list[list[BaseMessage]] = []

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> Any:
        self.received.append(list(messages))
        return super()._generate(messages, stop, run_manager, **kwargs)

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=tools, **kwargs)


def recording(answer: str) -> RecordingChat:
    return RecordingChat(received=[], responses=[AIMessage(content=answer)] * 8)


@pytest.fixture(scope="module")
def catalog() -> PriceCatalog:
    catalog = PriceCatalog.bundled()
    for name, price in ((SMALL, "0.1"), (LARGE, "1")):
        catalog.register({"name": name, "provider": "test", "mode": "chat",
                          "input_per_mtok": price, "output_per_mtok": price,
                          "context_window": WINDOWS[name], "max_output_tokens": 200,
                          "tokenizer": "o200k_base"})
    return catalog


@pytest.fixture
def engine(tmp_path, catalog: PriceCatalog):
    with Engine(db=str(tmp_path / "usage.db"), catalog=catalog) as eng:
        yield eng


def tokens(messages: list[BaseMessage], model: str, catalog: PriceCatalog) -> int:
    """The exact prompt count the fitter works with."""
    return count_message_tokens(convert_to_openai_messages(messages), model, catalog=catalog)


def admitted(messages: list[BaseMessage], model: str, catalog: PriceCatalog) -> int:
    """The count the router and the engine's admission see. Their converter writes tool-call
    arguments as compact JSON, so it counts one token fewer per tool call here."""
    return count_message_tokens(to_openai_messages(messages), model, catalog=catalog)


def history(turns: int) -> list[BaseMessage]:
    """A system message, ``turns`` question/answer pairs, a tool call block, a last question."""
    messages: list[BaseMessage] = [SystemMessage("You answer weather questions tersely.")]
    for i in range(turns):
        messages += [HumanMessage(f"Question {i}: what is the weather in city number {i}?"),
                     AIMessage(f"Answer {i}: sunny, light wind from the west, 18 degrees.")]
    messages += [
        HumanMessage("Look up the forecast for Lisbon."),
        AIMessage("", tool_calls=[{"name": "forecast", "args": {"city": "Lisbon"},
                                   "id": "call_lisbon"}]),
        ToolMessage("Lisbon: " + "rain showers, 14 degrees, humidity 80 percent; " * 4,
                    tool_call_id="call_lisbon"),
        AIMessage("Rain in Lisbon, 14 degrees."),
        HumanMessage("And tomorrow?"),
    ]
    return messages


def routed(engine: Engine, small: RecordingChat | None = None,
           large: RecordingChat | None = None, **kwargs: Any) -> RoutedChatModel:
    kwargs.setdefault("router", Router({"low": SMALL, "high": LARGE}, engine=engine))
    return RoutedChatModel(models={SMALL: small or recording("small answer"),
                                   LARGE: large or recording("large answer")},
                           engine=engine, **kwargs)


def assert_well_formed_fit(received: list[BaseMessage], full: list[BaseMessage]) -> None:
    """System kept, a suffix of the history that starts on a user turn, tool blocks whole."""
    assert received[0] is full[0]
    rest = received[1:]
    assert all(a is b for a, b in zip(rest, full[len(full) - len(rest):]))
    assert isinstance(rest[0], HumanMessage)
    for i, message in enumerate(rest):
        if isinstance(message, ToolMessage):
            call = rest[i - 1]
            assert isinstance(call, AIMessage) and i > 0
            assert call.tool_calls[0]["id"] == message.tool_call_id


# ---------------------------------------------------------------------------- off by default

def test_without_fit_context_an_overflow_still_raises(engine: Engine, catalog) -> None:
    small, large = recording("s"), recording("l")
    full = history(40)
    assert tokens(full, LARGE, catalog) > WINDOWS[LARGE]
    model = routed(engine, small, large, reserve_output=RESERVE)  # reserve alone changes nothing
    with pytest.raises(ContextWindowExceeded, match="fits no routed model"):
        model.invoke(full)
    with pytest.raises(ContextWindowExceeded, match="required model small-chat"):
        model.invoke(history(14), model=SMALL)
    assert small.received == [] and large.received == [] and engine.usage() == []


def test_router_escalates_to_a_larger_window_before_fitting(engine: Engine, catalog) -> None:
    full = history(14)
    count = admitted(full, SMALL, catalog)
    assert WINDOWS[SMALL] < count + RESERVE <= WINDOWS[LARGE]
    small, large = recording("s"), recording("l")
    # thresholds of 1: the learned score alone never routes up here, only the window does
    router = Router({"low": SMALL, "high": LARGE}, engine=engine, thresholds=(1.0, 1.0))
    out = routed(engine, small, large, router=router, fit_context=True,
                 reserve_output=RESERVE).invoke(full)
    assert large.received == [full] and small.received == []  # whole, not cut
    marker = out.response_metadata[ROUTED_MARKER]
    assert "context_fit" not in marker
    assert f"exceed {SMALL}'s window of 600 -> {LARGE}" in marker["route_reason"]
    (row,) = engine.usage()
    assert row.model == LARGE and "context_fit" not in row.metadata_
    assert row.input_tokens == count


# --------------------------------------------------------------------- fitting, explained

def test_when_no_window_fits_the_largest_model_gets_the_fitted_history(engine: Engine,
                                                                       catalog) -> None:
    full = history(40)
    small, large = recording("s"), recording("large answer")
    out = routed(engine, small, large, fit_context=True, reserve_output=RESERVE).invoke(full)

    assert out.content == "large answer" and small.received == []
    (received,) = large.received
    assert_well_formed_fit(received, full)
    assert received[-5:] == full[-5:]  # the newest turn and the tool block kept
    limit = WINDOWS[LARGE] - RESERVE
    after = tokens(received, LARGE, catalog)
    assert after <= limit
    # as much as fits: the next older turn (question + answer) would not
    older = full[len(full) - len(received) - 1:len(full) - len(received) + 1]
    assert tokens([full[0], *older, *received[1:]], LARGE, catalog) > limit

    before = tokens(full, LARGE, catalog)
    fit = {"model": LARGE, "tokens_before": before, "tokens_after": after, "limit": limit,
           "dropped": len(full) - len(received), "truncated": False}
    marker = out.response_metadata[ROUTED_MARKER]
    assert marker["model"] == LARGE and marker["context_fit"] == fit
    (row,) = engine.usage()
    assert row.model == LARGE and row.status == "ok"
    assert row.metadata_["context_fit"] == fit
    assert row.input_tokens == admitted(received, LARGE, catalog)
    assert row.usage_source == "estimated"
    assert row.route_reason == marker["route_reason"]
    assert row.route_reason.startswith(
        f"no routed model's window takes {admitted(full, LARGE, catalog) + RESERVE} tokens "
        f"(prompt + reserved output) -> {LARGE}, the largest window (1200)")
    assert row.route_reason.endswith(
        f"; context fit: {before} -> {after} tokens for {LARGE} (limit {limit}), "
        f"{fit['dropped']} messages dropped")


def test_a_tool_call_block_is_kept_or_dropped_whole(engine: Engine, catalog) -> None:
    full = history(40)
    call_at = next(i for i, m in enumerate(full) if isinstance(m, ToolMessage)) - 1
    system = full[:1]
    # Allowances chosen so a cut by tokens alone would keep the tool result but not its call
    from_result = tokens(system + full[call_at + 1:], LARGE, catalog)
    from_question = tokens(system + full[call_at - 1:], LARGE, catalog)
    for limit, expected_start in ((from_result, call_at + 3), (from_question, call_at - 1)):
        large = recording("l")
        routed(engine, None, large, fit_context=True,
               reserve_output=WINDOWS[LARGE] - limit).invoke(full)
        (received,) = large.received
        assert_well_formed_fit(received, full)
        assert received[1:] == full[expected_start:]
    # first run: the block and the reply after it went (the kept part starts on a question)
    # second run: the block stayed, with the question that asked for it


def test_required_model_is_fitted_to_its_own_window(engine: Engine, catalog) -> None:
    full = history(14)
    small, large = recording("small answer"), recording("l")
    out = routed(engine, small, large, fit_context=True,
                 reserve_output=RESERVE).invoke(full, model=SMALL)
    assert out.content == "small answer" and large.received == []
    (received,) = small.received
    assert_well_formed_fit(received, full)
    assert len(received) < len(full)
    assert tokens(received, SMALL, catalog) <= WINDOWS[SMALL] - RESERVE
    (row,) = engine.usage()
    assert row.model == SMALL and row.route_reason.startswith(
        f"required model {SMALL}; {admitted(full, SMALL, catalog) + RESERVE} tokens")
    assert row.metadata_["context_fit"]["model"] == SMALL


def test_a_newest_message_too_long_alone_is_cut_in_the_middle(engine: Engine, catalog) -> None:
    long_question = "BEGIN " + "the quick brown fox jumps over the lazy dog " * 200 + " END?"
    full = [SystemMessage("Be brief."), HumanMessage("hi"), AIMessage("hello"),
            HumanMessage(long_question)]
    large = recording("l")
    out = routed(engine, None, large, fit_context=True, reserve_output=RESERVE).invoke(full)
    (received,) = large.received
    assert [type(m) for m in received] == [SystemMessage, HumanMessage]
    cut = received[1].content
    assert cut.startswith("BEGIN ") and cut.endswith(" END?") and "…[truncated " in cut
    assert tokens(received, LARGE, catalog) <= WINDOWS[LARGE] - RESERVE
    marker = out.response_metadata[ROUTED_MARKER]
    assert marker["context_fit"]["truncated"] is True and marker["context_fit"]["dropped"] == 2
    assert "newest user message cut in the middle" in marker["route_reason"]


def test_bound_tools_are_counted_in_the_fit(engine: Engine, catalog) -> None:
    def forecast(city: str, days: int, units: str, detail: str) -> str:
        """Weather forecast for a city: temperature, rain, wind, humidity, per day, in the
        units asked for, with as much detail as asked (summary, hourly, or full)."""
        return city

    full = history(40)
    plain, with_tools = recording("l"), recording("l")
    routed(engine, None, plain, fit_context=True, reserve_output=RESERVE).invoke(full)
    routed(engine, None, with_tools, fit_context=True,
           reserve_output=RESERVE).bind_tools([forecast]).invoke(full)
    assert len(with_tools.received[0]) < len(plain.received[0])
    assert_well_formed_fit(with_tools.received[0], full)


# ------------------------------------------------------------- every path sends the fit

def test_stream_ainvoke_and_astream_send_the_same_fitted_history(engine: Engine) -> None:
    full = history(40)
    large = recording("large answer")
    model = routed(engine, None, large, fit_context=True, reserve_output=RESERVE)
    model.invoke(full)
    chunks = list(model.stream(full))
    assert "".join(c.content for c in chunks) == "large answer"
    assert chunks[0].response_metadata[ROUTED_MARKER]["context_fit"]["model"] == LARGE
    out = asyncio.run(model.ainvoke(full))
    assert out.response_metadata[ROUTED_MARKER]["model"] == LARGE

    async def astream() -> str:
        return "".join([c.content async for c in model.astream(full)])  # type: ignore[misc]

    assert asyncio.run(astream()) == "large answer"
    first, *others = large.received
    assert len(others) == 3 and all(r == first for r in others) and len(first) < len(full)
    rows = engine.usage()
    assert len(rows) == 4
    assert len({r.metadata_["context_fit"]["tokens_after"] for r in rows}) == 1


def test_cascade_attempts_are_each_fitted_to_their_model(engine: Engine, catalog) -> None:
    full = history(40)
    small, large = recording("no"), recording("a long and useful answer")
    model = routed(engine, small, large, router=None, fit_context=True, reserve_output=RESERVE,
                   cascade=Cascade([SMALL, LARGE], [MinLength(10)]))
    assert model.invoke(full).content == "a long and useful answer"
    (to_small,), (to_large,) = small.received, large.received
    assert len(to_small) < len(to_large) < len(full)
    assert tokens(to_small, SMALL, catalog) <= WINDOWS[SMALL] - RESERVE
    rows = sorted(engine.usage(), key=lambda r: r.attempt)
    assert [(r.model, r.metadata_["context_fit"]["model"]) for r in rows] == [
        (SMALL, SMALL), (LARGE, LARGE)]
    assert [r.input_tokens for r in rows] == [admitted(to_small, SMALL, catalog),
                                              admitted(to_large, LARGE, catalog)]


def test_default_model_is_fitted_only_when_asked(engine: Engine) -> None:
    full = history(40)
    unchanged, fitted = recording("l"), recording("l")
    # no router: no window check, as before; the engine brings the catalog
    RoutedChatModel(models={LARGE: unchanged}, engine=engine).invoke(full)
    RoutedChatModel(models={LARGE: fitted}, engine=engine, fit_context=True,
                    max_tokens=RESERVE).invoke(full)
    assert unchanged.received == [full]
    assert_well_formed_fit(fitted.received[0], full)
    assert len(fitted.received[0]) < len(full)


def test_bad_reserve_output_is_a_typed_error() -> None:
    with pytest.raises(ConfigurationError, match="reserve_output"):
        RoutedChatModel(models={LARGE: recording("l")}, fit_context=True, reserve_output=-1)
