"""RoutedLLM(fit_context=True): a prompt too long for the chosen model is fitted to it.

Two catalog models with small windows keep the histories short: "small-chat" (600 tokens)
and "large-chat" (1,200). Expected counts come from what llama-index-llms-openai would send
(``to_openai_message_dicts``) and budgetkit's exact counter, not from the fitter.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseGen,
                                              CompletionResponse, CompletionResponseGen,
                                              LLMMetadata)
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback

from budgetkit import (Cascade, ConfigurationError, ContextWindowExceeded, Engine, MinLength,
                       PriceCatalog, Router, count_message_tokens)
from llama_index.callbacks.budgetkit.messages import to_openai_messages
from llama_index.llms.budgetkit import RoutedLLM
from llama_index.llms.budgetkit._routed import ROUTED_MARKER

openai_utils = pytest.importorskip("llama_index.llms.openai.utils")

SMALL, LARGE = "small-chat", "large-chat"
WINDOWS = {SMALL: 600, LARGE: 1200}
RESERVE = 100


class RecordingLLM(CustomLLM):
    """Answers ``reply`` and records the messages (or prompt) of every call it gets.

    No usage is reported, so rows hold the admitted (estimated) input count.
    """

    reply: str = "an answer"
    chats: list[list[ChatMessage]] = []
    prompts: list[str] = []

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=1200, num_output=RESERVE, model_name="recording")

    @llm_chat_callback()
    def chat(self, messages: Any, **kwargs: Any) -> ChatResponse:
        self.chats.append(list(messages))
        return ChatResponse(message=ChatMessage(role="assistant", content=self.reply))

    @llm_chat_callback()
    def stream_chat(self, messages: Any, **kwargs: Any) -> ChatResponseGen:
        self.chats.append(list(messages))

        def gen() -> ChatResponseGen:
            text = ""
            for word in self.reply.split(" "):
                delta = word if not text else " " + word
                text += delta
                yield ChatResponse(message=ChatMessage(role="assistant", content=text),
                                   delta=delta)

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.prompts.append(prompt)
        return CompletionResponse(text=self.reply)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        self.prompts.append(prompt)

        def gen() -> CompletionResponseGen:
            yield CompletionResponse(text=self.reply, delta=self.reply)

        return gen()


def recording(reply: str) -> RecordingLLM:
    return RecordingLLM(reply=reply, chats=[], prompts=[])


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


def tokens(messages: list[ChatMessage], model: str, catalog: PriceCatalog) -> int:
    """The exact count of what llama-index-llms-openai would send."""
    return count_message_tokens(openai_utils.to_openai_message_dicts(messages), model,
                                catalog=catalog)


def admitted(messages: list[ChatMessage], model: str, catalog: PriceCatalog) -> int:
    """The count the router and the engine's admission see (the tracker's conversion, which
    leaves tool calls out)."""
    return count_message_tokens(to_openai_messages(messages), model, catalog=catalog)


def history(turns: int) -> list[ChatMessage]:
    """A system message, ``turns`` question/answer pairs, a tool call block, a last question."""
    messages = [ChatMessage(role="system", content="You answer weather questions tersely.")]
    for i in range(turns):
        messages += [
            ChatMessage(role="user", content=f"Question {i}: what is the weather in city {i}?"),
            ChatMessage(role="assistant",
                        content=f"Answer {i}: sunny, light wind from the west, 18 degrees.")]
    call = {"id": "call_lisbon", "type": "function",
            "function": {"name": "forecast", "arguments": '{"city": "Lisbon"}'}}
    messages += [
        ChatMessage(role="user", content="Look up the forecast for Lisbon."),
        ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [call]}),
        ChatMessage(role="tool", content="Lisbon: " + "rain showers, 14 degrees; " * 6,
                    additional_kwargs={"tool_call_id": "call_lisbon"}),
        ChatMessage(role="assistant", content="Rain in Lisbon, 14 degrees."),
        ChatMessage(role="user", content="And tomorrow?"),
    ]
    return messages


def routed(engine: Engine, small: RecordingLLM | None = None,
           large: RecordingLLM | None = None, **kwargs: Any) -> RoutedLLM:
    kwargs.setdefault("router", Router({"low": SMALL, "high": LARGE}, engine=engine))
    return RoutedLLM(models={SMALL: small or recording("small answer"),
                             LARGE: large or recording("large answer")},
                     engine=engine, **kwargs)


def assert_well_formed_fit(received: list[ChatMessage], full: list[ChatMessage]) -> None:
    """System kept, a suffix of the history that starts on a user turn, tool blocks whole."""
    assert received[0] is full[0]
    rest = received[1:]
    assert all(a is b for a, b in zip(rest, full[len(full) - len(rest):]))
    assert rest[0].role.value == "user"
    for i, message in enumerate(rest):
        if message.role.value == "tool":
            call = rest[i - 1]
            assert i > 0 and call.role.value == "assistant"
            assert (call.additional_kwargs["tool_calls"][0]["id"]
                    == message.additional_kwargs["tool_call_id"])


# ---------------------------------------------------------------------------- off by default

def test_without_fit_context_an_overflow_still_raises(engine: Engine, catalog) -> None:
    small, large = recording("s"), recording("l")
    full = history(40)
    assert tokens(full, LARGE, catalog) > WINDOWS[LARGE]
    llm = routed(engine, small, large, reserve_output=RESERVE)  # reserve alone changes nothing
    with pytest.raises(ContextWindowExceeded, match="fits no routed model"):
        llm.chat(full)
    with pytest.raises(ContextWindowExceeded, match="fits no routed model"):
        llm.complete("word " * 2000)
    assert small.chats == large.chats == [] and small.prompts == large.prompts == []
    assert engine.usage() == []


def test_router_escalates_to_a_larger_window_before_fitting(engine: Engine, catalog) -> None:
    full = history(14)
    count = admitted(full, SMALL, catalog)
    assert WINDOWS[SMALL] < count + RESERVE <= WINDOWS[LARGE]
    small, large = recording("s"), recording("l")
    # thresholds of 1: the learned score alone never routes up here, only the window does
    router = Router({"low": SMALL, "high": LARGE}, engine=engine, thresholds=(1.0, 1.0))
    response = routed(engine, small, large, router=router, fit_context=True,
                      reserve_output=RESERVE).chat(full)
    assert large.chats == [full] and small.chats == []  # whole, not cut
    marker = response.additional_kwargs[ROUTED_MARKER]
    assert "context_fit" not in marker
    assert f"exceed {SMALL}'s window of 600 -> {LARGE}" in marker["route_reason"]
    (row,) = engine.usage()
    assert row.model == LARGE and "context_fit" not in row.metadata_


# --------------------------------------------------------------------- fitting, explained

def test_when_no_window_fits_the_largest_model_gets_the_fitted_chat(engine: Engine,
                                                                    catalog) -> None:
    full = history(40)
    small, large = recording("s"), recording("large answer")
    llm = routed(engine, small, large, fit_context=True, reserve_output=RESERVE)
    response = llm.chat(full)

    assert response.message.content == "large answer" and small.chats == []
    (received,) = large.chats
    assert_well_formed_fit(received, full)
    assert received[-5:] == full[-5:]  # the newest turn and the tool block kept
    limit = WINDOWS[LARGE] - RESERVE
    after = tokens(received, LARGE, catalog)
    assert after <= limit
    k = len(full) - len(received) + 1  # where the kept history starts
    assert tokens([full[0], *full[k - 2:]], LARGE, catalog) > limit  # one turn more: too long

    fit = {"model": LARGE, "tokens_before": tokens(full, LARGE, catalog), "tokens_after": after,
           "limit": limit, "dropped": len(full) - len(received), "truncated": False}
    marker = response.additional_kwargs[ROUTED_MARKER]
    assert marker["model"] == LARGE and marker["context_fit"] == fit
    (row,) = engine.usage()
    assert row.metadata_["context_fit"] == fit and row.status == "ok"
    assert row.input_tokens == admitted(received, LARGE, catalog)
    assert row.route_reason == marker["route_reason"]
    assert row.route_reason.startswith(
        f"no routed model's window takes {admitted(full, LARGE, catalog) + RESERVE} tokens")
    assert row.route_reason.endswith(
        f"; context fit: {fit['tokens_before']} -> {after} tokens for {LARGE} "
        f"(limit {limit}), {fit['dropped']} messages dropped")
    assert llm.last_decision is not None and llm.last_decision.model == LARGE


def test_a_tool_call_block_is_kept_or_dropped_whole(engine: Engine, catalog) -> None:
    full = history(40)
    call_at = next(i for i, m in enumerate(full) if m.role.value == "tool") - 1
    # Allowances chosen so a cut by tokens alone would keep the tool result but not its call
    from_result = tokens(full[:1] + full[call_at + 1:], LARGE, catalog)
    from_question = tokens(full[:1] + full[call_at - 1:], LARGE, catalog)
    for limit, expected_start in ((from_result, call_at + 3), (from_question, call_at - 1)):
        large = recording("l")
        routed(engine, None, large, fit_context=True,
               reserve_output=WINDOWS[LARGE] - limit).chat(full)
        (received,) = large.chats
        assert_well_formed_fit(received, full)
        assert received[1:] == full[expected_start:]


def test_a_complete_prompt_too_long_is_cut_in_the_middle(engine: Engine, catalog) -> None:
    prompt = "BEGIN " + "the quick brown fox jumps over the lazy dog " * 200 + " END"
    large = recording("l")
    response = routed(engine, None, large, fit_context=True,
                      reserve_output=RESERVE).complete(prompt)
    (sent,) = large.prompts
    assert sent.startswith("BEGIN ") and sent.endswith(" END") and "…[truncated " in sent
    as_message = [{"role": "user", "content": sent}]
    assert count_message_tokens(as_message, LARGE, catalog=catalog) <= WINDOWS[LARGE] - RESERVE
    marker = response.additional_kwargs[ROUTED_MARKER]
    assert marker["context_fit"]["truncated"] is True and marker["context_fit"]["dropped"] == 0
    assert "newest user message cut in the middle" in marker["route_reason"]
    (row,) = engine.usage()
    assert row.operation_type == "text_generation"
    assert row.input_tokens < WINDOWS[LARGE] - RESERVE  # the cut prompt was admitted


def test_required_model_is_fitted_to_its_own_window(engine: Engine, catalog) -> None:
    full = history(14)
    small, large = recording("small answer"), recording("l")
    llm = routed(engine, small, large, fit_context=True, reserve_output=RESERVE)
    assert llm.chat(full, model=SMALL).message.content == "small answer"
    (received,) = small.chats
    assert_well_formed_fit(received, full)
    assert len(received) < len(full) and large.chats == []
    assert tokens(received, SMALL, catalog) <= WINDOWS[SMALL] - RESERVE
    (row,) = engine.usage()
    assert row.route_reason.startswith(f"required model {SMALL}; ")
    assert row.metadata_["context_fit"]["model"] == SMALL


# ------------------------------------------------------------- every path sends the fit

def test_stream_and_async_forms_send_the_same_fitted_chat(engine: Engine) -> None:
    full = history(40)
    large = recording("large answer")
    llm = routed(engine, None, large, fit_context=True, reserve_output=RESERVE)
    llm.chat(full)
    pieces = list(llm.stream_chat(full))
    assert pieces[-1].message.content == "large answer"
    assert pieces[0].additional_kwargs[ROUTED_MARKER]["context_fit"]["model"] == LARGE
    assert asyncio.run(llm.achat(full)).message.content == "large answer"

    async def astream() -> str:
        last = None
        async for piece in await llm.astream_chat(full):
            last = piece
        return last.message.content

    assert asyncio.run(astream()) == "large answer"
    first, *others = large.chats
    assert len(others) == 3 and all(r == first for r in others) and len(first) < len(full)
    rows = engine.usage()
    assert len(rows) == 4
    assert len({r.metadata_["context_fit"]["tokens_after"] for r in rows}) == 1


def test_cascade_attempts_are_each_fitted_to_their_model(engine: Engine, catalog) -> None:
    full = history(40)
    small, large = recording("no"), recording("a long and useful answer")
    llm = routed(engine, small, large, router=None, fit_context=True, reserve_output=RESERVE,
                 cascade=Cascade([SMALL, LARGE], [MinLength(10)]))
    assert llm.chat(full).message.content == "a long and useful answer"
    (to_small,), (to_large,) = small.chats, large.chats
    assert len(to_small) < len(to_large) < len(full)
    assert tokens(to_small, SMALL, catalog) <= WINDOWS[SMALL] - RESERVE
    rows = sorted(engine.usage(), key=lambda r: r.attempt)
    assert [(r.model, r.metadata_["context_fit"]["model"]) for r in rows] == [
        (SMALL, SMALL), (LARGE, LARGE)]


def test_default_model_is_fitted_only_when_asked(engine: Engine) -> None:
    full = history(40)
    unchanged, fitted = recording("l"), recording("l")
    # no router: no window check, as before; the engine brings the catalog
    RoutedLLM(models={LARGE: unchanged}, engine=engine).chat(full)
    RoutedLLM(models={LARGE: fitted}, engine=engine, fit_context=True,
              max_tokens=RESERVE).chat(full)
    assert unchanged.chats == [full]
    assert_well_formed_fit(fitted.chats[0], full)
    assert len(fitted.chats[0]) < len(full)


def test_bad_reserve_output_is_a_typed_error() -> None:
    with pytest.raises(ConfigurationError, match="reserve_output"):
        RoutedLLM(models={LARGE: recording("l")}, fit_context=True, reserve_output=-1)
