"""budgetkit's context fitter for LlamaIndex chat messages.

ChatMessages are converted to OpenAI-format dicts the way llama-index-llms-openai sends
them (text blocks joined, tool calls from ``ToolCallBlock`` or ``additional_kwargs``) as the
fitter reads them, and fitted with the rules of :func:`budgetkit.fit_messages`. The caller
gets back its own ChatMessage objects; only a user message cut to fit is a copy with a new
text block.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (ChatMessage, ImageBlock, TextBlock,
                                              ToolCallBlock)

from budgetkit import ConfigurationError, FitResult, PriceCatalog
from budgetkit.fitting import LazyOpenAIMessages, OnOverflow, fit_message_sequence

__all__ = ["fit_messages", "to_openai_message"]

_ASSISTANT_ALIASES = {"chatbot": "assistant", "model": "assistant"}


def _tool_call(call: Any) -> dict[str, Any]:
    if hasattr(call, "model_dump"):  # openai's ChatCompletionMessageToolCall
        call = call.model_dump()
    if not isinstance(call, Mapping):
        raise ConfigurationError(f"tool call must be a dict or an OpenAI tool call object, got "
                                 f"{type(call).__name__}")
    return dict(call)


def to_openai_message(message: ChatMessage) -> dict[str, Any]:
    """One ChatMessage as an OpenAI-format dict, for counting.

    ``content`` is a string when the message is a single text block, else a list of parts
    parallel to ``message.blocks`` (blocks without text, such as audio or thinking, count as
    empty text: their tokens are not estimated).
    """
    role = message.role.value if hasattr(message.role, "value") else str(message.role)
    out: dict[str, Any] = {"role": _ASSISTANT_ALIASES.get(role, role)}
    parts: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append({"type": "image_url", "image_url": {"url": str(block.url or "")}})
        else:
            if isinstance(block, ToolCallBlock):
                arguments = block.tool_kwargs
                tool_calls.append({"id": block.tool_call_id, "type": "function", "function": {
                    "name": block.tool_name,
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
            parts.append({"type": "text", "text": ""})
    if len(message.blocks) == 1 and isinstance(message.blocks[0], TextBlock):
        out["content"] = message.blocks[0].text
    elif all(isinstance(b, TextBlock) for b in message.blocks):
        out["content"] = "".join(p["text"] for p in parts)  # as llama-index-llms-openai sends it
    else:
        out["content"] = parts
    extra = message.additional_kwargs or {}
    tool_calls.extend(_tool_call(c) for c in extra.get("tool_calls") or ())
    if tool_calls:
        out["tool_calls"] = tool_calls
    if extra.get("tool_call_id"):
        out["tool_call_id"] = str(extra["tool_call_id"])
    if isinstance(extra.get("name"), str):
        out["name"] = extra["name"]
    return out


def _cut_copy(original: ChatMessage, fitted: Mapping[str, Any]) -> ChatMessage:
    content = fitted["content"]
    blocks = list(original.blocks)
    if isinstance(content, str):
        if len(blocks) == 1 and isinstance(blocks[0], TextBlock):
            blocks = [TextBlock(text=content)]
        else:  # several text blocks were joined: the cut text replaces them, in the first's place
            first = next(i for i, b in enumerate(blocks) if isinstance(b, TextBlock))
            blocks = [b for i, b in enumerate(blocks) if i == first or not isinstance(b, TextBlock)]
            blocks[first] = TextBlock(text=content)
    else:
        for i, part in enumerate(content):
            block = blocks[i]
            if isinstance(block, TextBlock) and part.get("text") != block.text:
                blocks[i] = TextBlock(text=part["text"])
    return original.model_copy(update={"blocks": blocks,
                                       "additional_kwargs": dict(original.additional_kwargs)})


class _Converted(LazyOpenAIMessages):
    """ChatMessages in OpenAI form, converted when the fitter first reads them."""

    def _convert(self, index: int) -> dict[str, Any]:
        return to_openai_message(self._messages[index])

    def role(self, index: int) -> str:
        role = self._messages[index].role
        role = role.value if hasattr(role, "value") else str(role)
        return _ASSISTANT_ALIASES.get(role, role)


def fit_messages(messages: Sequence[ChatMessage], model: str, *,
                 reserve_output: int | None = None, max_tokens: int | None = None,
                 on_overflow: OnOverflow = "truncate",
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 catalog: PriceCatalog | None = None) -> FitResult[ChatMessage]:
    """Keep the system messages and the most recent turns of a LlamaIndex chat that fit.

    Same rules and arguments as :func:`budgetkit.fit_messages` (``tools`` are OpenAI tool
    dicts, e.g. ``[t.metadata.to_openai_tool() for t in tools]``). Returns the kept original
    ChatMessage objects and the report. Messages are converted only as far as the fit reads.
    """
    originals = list(messages)
    for i, message in enumerate(originals):
        if not isinstance(message, ChatMessage):
            raise ConfigurationError(
                f"messages[{i}] must be a LlamaIndex ChatMessage, got {type(message).__name__}")
    converted = _Converted(originals)
    result = fit_message_sequence(converted, [converted.role(i) for i in range(len(originals))],
                                  model, reserve_output=reserve_output, max_tokens=max_tokens,
                                  on_overflow=on_overflow,
                                  tools=tools, catalog=catalog)
    report = result.report
    kept = [_cut_copy(originals[index], result.messages[position])
            if index == report.truncated_index else originals[index]
            for position, index in enumerate(report.kept)]
    return FitResult(kept, report)
