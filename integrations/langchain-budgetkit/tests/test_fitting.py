"""langchain_budgetkit.fit_messages, and a peer check against LangChain's trim_messages."""

from __future__ import annotations

import random

import pytest
from langchain_core.messages import (AIMessage, BaseMessage, HumanMessage, SystemMessage,
                                     ToolMessage, convert_to_openai_messages, trim_messages)
from langchain_core.tools import tool

from budgetkit import ConfigurationError, ContextWindowExceeded, count_message_tokens
from langchain_budgetkit import fit_messages
from langchain_budgetkit._fitting import to_openai_messages

MODEL = "gpt-4o"
PRIMING = count_message_tokens([], MODEL)  # reply priming, counted once per request
WORDS = "budget token window model reply history tool result alpha beta über 東京 🙂".split()


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def lc_history(rng: random.Random, turns: int, tool_rate: float) -> list[BaseMessage]:
    messages: list[BaseMessage] = [SystemMessage(words(rng, 5, 30), id="sys")]
    call = 0
    for turn in range(turns):
        messages.append(HumanMessage(words(rng, 1, 80), id=f"h{turn}"))
        while rng.random() < tool_rate:
            ids = [f"call_{call + k}" for k in range(rng.randint(1, 3))]
            call += len(ids)
            messages.append(AIMessage("", tool_calls=[
                {"name": "lookup", "args": {"key": words(rng, 1, 3)}, "id": i} for i in ids]))
            messages.extend(ToolMessage(words(rng, 1, 120), tool_call_id=i) for i in ids)
        messages.append(AIMessage(words(rng, 1, 150), id=f"a{turn}"))
    return messages


def budgetkit_counter(messages: list[BaseMessage]) -> int:
    """Tokens of the messages themselves (without the once-per-request reply priming), so
    that trim_messages, which counts the system message and the rest separately, adds up to
    the same total as one count of the whole prompt."""
    return count_message_tokens(convert_to_openai_messages(messages), MODEL) - PRIMING


def test_returns_the_original_objects():
    rng = random.Random(3)
    messages = lc_history(rng, 30, 0.3)
    full = budgetkit_counter(messages) + PRIMING
    kept, report = fit_messages(messages, MODEL, max_tokens=full // 3)
    assert report.dropped > 0 and not report.truncated
    assert all(any(k is m for m in messages) for k in kept)
    assert kept[0] is messages[0] and isinstance(kept[1], HumanMessage)
    assert report.tokens_after == budgetkit_counter(kept) + PRIMING <= full // 3


def test_truncated_user_message_is_a_copy():
    big = HumanMessage(" ".join(f"w{i}" for i in range(2000)), id="big",
                       additional_kwargs={"k": 1})
    messages = [SystemMessage("sys"), HumanMessage("old"), AIMessage("reply"), big]
    kept, report = fit_messages(messages, MODEL, max_tokens=150)
    assert report.truncated and report.truncated_index == 3
    assert kept[0] is messages[0]
    cut = kept[1]
    assert cut is not big and isinstance(cut, HumanMessage)
    assert cut.id == "big" and cut.additional_kwargs == {"k": 1}
    assert "…[truncated" in cut.content and len(cut.content) < len(big.content)
    assert big.content.startswith("w0 w1")  # the caller's message is untouched
    assert budgetkit_counter(kept) + PRIMING == report.tokens_after <= 150


def test_tools_are_counted():
    @tool
    def lookup(key: str) -> str:
        """Find a record by key."""
        return key

    messages = lc_history(random.Random(5), 10, 0.0)
    openai = convert_to_openai_messages(messages)
    limit = count_message_tokens([openai[0], *openai[-4:]], MODEL)
    assert len(fit_messages(messages, MODEL, max_tokens=limit).messages) == 5
    kept, report = fit_messages(messages, MODEL, max_tokens=limit, tools=[lookup])
    assert len(kept) == 3 and report.tokens_after <= limit


def test_long_histories_are_converted_only_as_far_as_read(monkeypatch):
    from langchain_budgetkit import _fitting

    converted = []
    real = _fitting._plain_openai
    monkeypatch.setattr(_fitting, "_plain_openai",
                        lambda message: converted.append(message) or real(message))
    messages = lc_history(random.Random(2), 500, 0.3)
    kept, report = fit_messages(messages, MODEL, max_tokens=2000)
    assert len(kept) < len(converted) < len(messages) // 5
    assert report.tokens_before == budgetkit_counter(messages) + PRIMING  # counts the rest


def test_fast_conversion_matches_convert_to_openai_messages():
    rng = random.Random(9)
    messages = lc_history(rng, 40, 0.5)
    messages += [HumanMessage("hi", name="bob"), AIMessage("ok", name="bot"),
                 SystemMessage("dev", additional_kwargs={"__openai_role__": "developer"}),
                 AIMessage("", tool_calls=[{"name": "f", "args": {"q": "東京", "n": [1, 2]},
                                            "id": "c1"}]),
                 ToolMessage("r", tool_call_id="c1", name="f"),
                 AIMessage("no", additional_kwargs={"refusal": "no"}),
                 HumanMessage([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
                 HumanMessage([{"type": "text", "text": "look"},
                               {"type": "image_url", "image_url": {"url": "https://x/y.png"}}])]
    assert to_openai_messages(messages) == convert_to_openai_messages(messages)


def test_bad_input_and_overflow():
    with pytest.raises(ConfigurationError, match=r"messages\[1\]"):
        fit_messages([HumanMessage("a"), {"role": "user", "content": "b"}], MODEL, max_tokens=50)
    with pytest.raises(ContextWindowExceeded):
        fit_messages([HumanMessage("x " * 400)], MODEL, max_tokens=50, on_overflow="raise")


# Peer check. trim_messages(strategy="last", include_system=True, start_on="human",
# allow_partial=False) and fit_messages follow the same rules when
#   - the history has at most one system message and it comes first (trim_messages keeps only
#     messages[0] as the system message), and
#   - at least the newest user turn fits: otherwise trim_messages returns the system message
#     alone, while fit_messages cuts the user message in the middle (checked below too).
# Tool calls do not break the agreement: a suffix that starts on a human message never
# splits a call from its results, in either implementation.
@pytest.mark.parametrize("seed", range(60))
def test_same_messages_kept_as_trim_messages(seed):
    rng = random.Random(seed)
    messages = lc_history(rng, rng.randint(1, 40), tool_rate=[0.0, 0.3, 0.6][seed % 3])
    full = budgetkit_counter(messages) + PRIMING
    window = rng.randint(max(PRIMING + 1, full // 10), full + 10)
    theirs = trim_messages(messages, max_tokens=window - PRIMING, token_counter=budgetkit_counter,
                           strategy="last", include_system=True, start_on="human",
                           allow_partial=False)
    try:
        ours, report = fit_messages(messages, MODEL, max_tokens=window)
    except ContextWindowExceeded:  # the newest turn cannot fit even with its user message cut
        assert theirs == messages[:1]
        return
    if report.truncated:
        assert theirs == messages[:1]
        return
    assert [id(m) for m in ours] == [id(m) for m in theirs]


def test_reserve_output_and_max_tokens_pass_through():
    history = [SystemMessage("be brief")] + [
        HumanMessage(f"question {i}: " + "detail " * 40) if i % 2 == 0
        else AIMessage(f"answer {i}: " + "detail " * 40) for i in range(40)]
    kept, report = fit_messages(history, "gpt-4o", reserve_output=500, max_tokens=1500)
    assert report.limit == 1000 and report.tokens_after <= 1000
    assert fit_messages(history, "gpt-4o", max_tokens=1500).report.tokens_after > 1000
    with pytest.raises(ConfigurationError, match="reserve_output"):
        fit_messages(history, "gpt-4o", reserve_output=1500, max_tokens=1500)
