"""llama_index.callbacks.budgetkit.fit_messages on LlamaIndex ChatMessages."""

from __future__ import annotations

import random

import pytest
from llama_index.core.base.llms.types import (ChatMessage, ImageBlock, MessageRole, TextBlock,
                                              ToolCallBlock)

from budgetkit import ConfigurationError, count_message_tokens
from llama_index.callbacks.budgetkit import fit_messages
from llama_index.callbacks.budgetkit._fitting import to_openai_message

MODEL = "gpt-4o"
WORDS = "budget token window model reply history tool result alpha beta über 東京 🙂".split()


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def chat_history(rng: random.Random, turns: int) -> list[ChatMessage]:
    messages = [ChatMessage(role=MessageRole.SYSTEM, content=words(rng, 5, 20))]
    call = 0
    for _ in range(turns):
        messages.append(ChatMessage(role=MessageRole.USER, content=words(rng, 1, 60)))
        if rng.random() < 0.4:
            call += 1
            cid = f"call_{call}"
            if rng.random() < 0.5:  # tool calls as llama-index-llms-openai stores them
                messages.append(ChatMessage(role=MessageRole.ASSISTANT, content="",
                                            additional_kwargs={"tool_calls": [{
                                                "id": cid, "type": "function",
                                                "function": {"name": "lookup",
                                                             "arguments": '{"k": 1}'}}]}))
            else:  # tool calls as content blocks
                messages.append(ChatMessage(role=MessageRole.ASSISTANT, blocks=[
                    ToolCallBlock(tool_call_id=cid, tool_name="lookup", tool_kwargs={"k": 1})]))
            messages.append(ChatMessage(role=MessageRole.TOOL, content=words(rng, 1, 80),
                                        additional_kwargs={"tool_call_id": cid}))
        messages.append(ChatMessage(role=MessageRole.ASSISTANT, content=words(rng, 1, 100)))
    return messages


@pytest.mark.parametrize("seed", range(15))
def test_keeps_original_objects_and_whole_tool_blocks(seed):
    rng = random.Random(seed)
    messages = chat_history(rng, rng.randint(2, 30))
    converted = [to_openai_message(m) for m in messages]
    full = count_message_tokens(converted, MODEL)
    limit = rng.randint(full // 4, full)
    kept, report = fit_messages(messages, MODEL, max_tokens=limit)
    assert [id(m) for m in kept] == [id(messages[i]) for i in report.kept]
    assert report.tokens_after == count_message_tokens([converted[i] for i in report.kept],
                                                       MODEL) <= limit
    assert kept[0].role == MessageRole.SYSTEM
    if len(kept) > 1:
        assert kept[1].role == MessageRole.USER
    pending: set[str] = set()
    for i in report.kept[1:]:
        message = converted[i]
        if message["role"] == "tool":
            assert message["tool_call_id"] in pending
            pending.discard(message["tool_call_id"])
        else:
            assert not pending
            pending = {c["id"] for c in message.get("tool_calls", ())}


def test_conversion_counts_like_llama_index_openai():
    """Our counting view of a ChatMessage matches what llama-index-llms-openai sends."""
    utils = pytest.importorskip("llama_index.llms.openai.utils")
    messages = [m for m in chat_history(random.Random(11), 12)
                if not any(isinstance(b, ToolCallBlock) for b in m.blocks)]
    messages.append(ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="a"),
                                                              TextBlock(text="b")]))
    ours = [to_openai_message(m) for m in messages]
    theirs = utils.to_openai_message_dicts(messages)
    assert count_message_tokens(ours, MODEL) == count_message_tokens(theirs, MODEL)


def test_cut_user_message_is_a_copy_and_keeps_its_image():
    image = ImageBlock(url="https://example.com/cat.png")
    big = ChatMessage(role=MessageRole.USER,
                      blocks=[TextBlock(text=" ".join(f"w{i}" for i in range(2000))), image],
                      additional_kwargs={"tag": "x"})
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="sys"),
                ChatMessage(role=MessageRole.USER, content="old"),
                ChatMessage(role=MessageRole.ASSISTANT, content="reply"), big]
    kept, report = fit_messages(messages, MODEL, max_tokens=200)
    assert report.truncated and report.kept == (0, 3)
    cut = kept[1]
    assert cut is not big and cut.blocks[1] is image
    assert "…[truncated" in cut.blocks[0].text
    assert cut.additional_kwargs == {"tag": "x"}
    assert big.blocks[0].text.startswith("w0 w1") and "truncated" not in big.blocks[0].text
    assert count_message_tokens([to_openai_message(m) for m in kept], MODEL) \
        == report.tokens_after <= 200


def test_plain_text_cut():
    messages = [ChatMessage(role=MessageRole.USER, content="x " * 1000)]
    kept, report = fit_messages(messages, MODEL, max_tokens=60)
    assert report.truncated and kept[0].content.count("truncated") == 1
    assert count_message_tokens([to_openai_message(kept[0])], MODEL) == report.tokens_after <= 60


def test_rejects_other_message_types():
    with pytest.raises(ConfigurationError, match=r"messages\[0\]"):
        fit_messages([{"role": "user", "content": "hi"}], MODEL, max_tokens=10)


def test_reserve_output_and_max_tokens_pass_through():
    chat = [ChatMessage(role=MessageRole.SYSTEM, content="be brief")] + [
        ChatMessage(role=MessageRole.USER if i % 2 == 0 else MessageRole.ASSISTANT,
                    content=f"turn {i}: " + "detail " * 40) for i in range(40)]
    kept, report = fit_messages(chat, "gpt-4o", reserve_output=500, max_tokens=1500)
    assert report.limit == 1000 and report.tokens_after <= 1000
    assert fit_messages(chat, "gpt-4o", max_tokens=1500).report.tokens_after > 1000
    with pytest.raises(ConfigurationError, match="reserve_output"):
        fit_messages(chat, "gpt-4o", reserve_output=1500, max_tokens=1500)
