"""budgetkit's context fitter for LangChain messages.

Messages are converted to OpenAI format as the fitter reads them (newest first, up to the
window), fitted with the rules of :func:`budgetkit.fit_messages`, and the caller gets back
its *own* message objects (ids, metadata and all); only a user message cut to fit is a copy
with new content.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (AIMessage, BaseMessage, HumanMessage, SystemMessage,
                                     ToolMessage, convert_to_openai_messages)

from budgetkit import ConfigurationError, FitResult, PriceCatalog
from budgetkit.fitting import LazyOpenAIMessages, OnOverflow, fit_message_sequence

__all__ = ["fit_messages", "to_openai_messages", "to_openai_tools"]


def to_openai_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """Tool definitions (LangChain tools, functions, pydantic models or dicts) as OpenAI
    tool dicts, for counting."""
    if not tools:
        return None
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return [convert_to_openai_tool(tool) for tool in tools]


_ROLES: dict[type[BaseMessage], str] = {
    HumanMessage: "user", AIMessage: "assistant", ToolMessage: "tool", SystemMessage: "system"}


def _plain_openai(message: BaseMessage) -> dict[str, Any] | None:
    """What ``convert_to_openai_messages`` makes of a plain text message, ten times faster
    (it dominates fitting time otherwise). ``None`` for anything else: multipart content,
    other message classes, invalid tool calls. A test compares both on generated histories.
    """
    role = _ROLES.get(type(message))
    content = message.content
    if role is None or type(content) is not str:
        return None
    if role == "system":
        role = message.additional_kwargs.get("__openai_role__", "system")
        if not isinstance(role, str):
            return None
    out: dict[str, Any] = {"role": role, "content": content}
    if message.name:
        out["name"] = message.name
    if role == "assistant" and isinstance(message, AIMessage):  # (role says it is one)
        if message.invalid_tool_calls:
            return None
        if message.tool_calls:
            out["tool_calls"] = [
                {"type": "function", "id": call["id"], "function": {
                    "name": call["name"],
                    "arguments": json.dumps(call["args"], ensure_ascii=False)}}
                for call in message.tool_calls]
    if message.additional_kwargs.get("refusal"):
        out["refusal"] = message.additional_kwargs["refusal"]
    if role == "tool" and isinstance(message, ToolMessage):  # (role says it is one)
        out["tool_call_id"] = message.tool_call_id
    return out


def _to_openai(message: BaseMessage, position: int) -> dict[str, Any]:
    plain = _plain_openai(message)
    if plain is not None:
        return plain
    # Some messages (e.g. Anthropic-style tool_result blocks in a HumanMessage) become
    # several OpenAI messages; fitting keeps or drops a message as a whole.
    several = convert_to_openai_messages([message])
    if len(several) != 1:
        raise ConfigurationError(
            f"messages[{position}] ({type(message).__name__}) converts to {len(several)} "
            "OpenAI messages; fit the OpenAI-format list with budgetkit.fit_messages")
    return several[0]


def _check(messages: Sequence[Any]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, BaseMessage):
            raise ConfigurationError(
                f"messages[{i}] must be a LangChain BaseMessage, got {type(message).__name__}")


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as OpenAI dicts, one per message, for counting."""
    _check(messages)
    return [_to_openai(message, i) for i, message in enumerate(messages)]


class _Converted(LazyOpenAIMessages):
    """LangChain messages in OpenAI form, converted when the fitter first reads them."""

    def _convert(self, index: int) -> dict[str, Any]:
        return _to_openai(self._messages[index], index)

    def role(self, index: int) -> str:
        message = self._messages[index]
        role = _ROLES.get(type(message))
        if role == "system":
            role = message.additional_kwargs.get("__openai_role__", "system")
        return role if isinstance(role, str) else self[index]["role"]


def fit_messages(messages: Sequence[BaseMessage], model: str, *,
                 reserve_output: int | None = None, max_tokens: int | None = None,
                 on_overflow: OnOverflow = "truncate", tools: Sequence[Any] | None = None,
                 catalog: PriceCatalog | None = None) -> FitResult[BaseMessage]:
    """Keep the system messages and the most recent turns of a LangChain history that fit.

    Same rules and arguments as :func:`budgetkit.fit_messages`; ``tools`` may be anything
    ``bind_tools`` accepts. Returns the kept original message objects and the report.
    """
    originals = list(messages)
    _check(originals)
    converted = _Converted(originals)
    result = fit_message_sequence(converted, [converted.role(i) for i in range(len(originals))],
                                  model, reserve_output=reserve_output, max_tokens=max_tokens,
                                  on_overflow=on_overflow,
                                  tools=to_openai_tools(tools), catalog=catalog)
    report = result.report
    kept: list[BaseMessage] = []
    for position, index in enumerate(report.kept):
        original = originals[index]
        if index == report.truncated_index:
            content = result.messages[position]["content"]
            original = original.model_copy(update={"content": content})
        kept.append(original)
    return FitResult(kept, report)
