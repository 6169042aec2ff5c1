"""LangChain messages → the OpenAI-format dicts budgetkit counts tokens on.

``langchain_core.messages.convert_to_openai_messages`` does this too, but it validates and
copies every content block; this runs on every model call, so it does only what token
counting needs: role, content (string or parts, passed through), name, tool calls and the
tool-call id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

__all__ = ["to_openai_messages", "message_text", "prompt_tokens_bound"]

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool",
          "function": "function", "developer": "developer", "AIMessageChunk": "assistant",
          "HumanMessageChunk": "user", "SystemMessageChunk": "system",
          "ToolMessageChunk": "tool"}


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Convert one prompt (a list of LangChain messages) to OpenAI-format dicts."""
    # Runs on every call: read only attributes each message type has (a missing attribute
    # on a pydantic model costs an exception), no copies of the content.
    converted = []
    for message in messages:
        kind = message.type
        role = _ROLES.get(kind)
        if role is None:
            role = getattr(message, "role", None) or kind  # ChatMessage has its own role
        item: dict[str, Any] = {"role": role, "content": message.content}
        if message.name:
            item["name"] = message.name
        if role == "assistant":
            tool_calls = getattr(message, "tool_calls", None)
            if tool_calls:
                item["tool_calls"] = [
                    {"id": call.get("id"), "type": "function",
                     "function": {"name": call.get("name", ""),
                                  # as langchain-openai serialises them when sending
                                  "arguments": json.dumps(call.get("args", {}),
                                                          ensure_ascii=False)}}
                    for call in tool_calls]
        elif role == "tool":
            item["tool_call_id"] = getattr(message, "tool_call_id", None)
        converted.append(item)
    return converted


# Per message of a plain text prompt: at most 4 tokens of chat formatting and the role
# ("assistant" at most, and a separator), as budgetkit.pricing._tokens.message_tokens_bound counts.
_MESSAGE_BOUND = 4 + 10
_REPLY_PRIMING = 3


def prompt_tokens_bound(messages: Sequence[BaseMessage]) -> int | None:
    """An upper bound of the tokens of a prompt of plain text messages (system, human, and
    AI messages without tool calls), for any model: what
    ``budgetkit.pricing._tokens.message_tokens_bound`` gives for :func:`to_openai_messages`, or
    a little more, without converting. None for anything else, which must be counted."""
    # Runs before every call admitted in a lane: exact type tests, no conversion.
    total = _REPLY_PRIMING
    for message in messages:
        content = message.content
        kind = type(message)
        # (mypy does not narrow through `kind`: tool_calls is read only from an AIMessage)
        if type(content) is not str or (
                kind is not HumanMessage and kind is not SystemMessage
                and (kind is not AIMessage or message.tool_calls)):  # type: ignore[attr-defined]
            return None
        total += _MESSAGE_BOUND + (len(content) if content.isascii()
                                   else len(content.encode("utf-8", "surrogatepass")))
        if message.name:
            total += len(message.name.encode("utf-8", "surrogatepass")) + 1
    return total


def message_text(content: Any) -> str:
    """The text of a message content (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return "" if content is None else str(content)
