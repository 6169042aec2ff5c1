"""budgetkit's context fitter for LangChain messages.

The messages are converted to OpenAI format once, fitted by :func:`budgetkit.fit_messages`,
and the caller gets back its *own* message objects (ids, metadata and all); only a user
message cut to fit is a copy with new content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_openai_messages

from budgetkit import ConfigurationError, FitResult, PriceCatalog
from budgetkit import fit_messages as _fit_openai_messages

__all__ = ["fit_messages", "to_openai_tools"]


def to_openai_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """Tool definitions (LangChain tools, functions, pydantic models or dicts) as OpenAI
    tool dicts, for counting."""
    if not tools:
        return None
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return [convert_to_openai_tool(tool) for tool in tools]


def _as_openai(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    for i, message in enumerate(messages):
        if not isinstance(message, BaseMessage):
            raise ConfigurationError(
                f"messages[{i}] must be a LangChain BaseMessage, got {type(message).__name__}")
    converted = convert_to_openai_messages(messages)
    if len(converted) == len(messages):
        return converted
    # Some messages (e.g. Anthropic-style tool_result blocks in a HumanMessage) become several
    # OpenAI messages; fitting must keep or drop a LangChain message as a whole.
    for i, message in enumerate(messages):
        if len(convert_to_openai_messages([message])) != 1:
            raise ConfigurationError(
                f"messages[{i}] ({type(message).__name__}) converts to several OpenAI "
                "messages; fit the OpenAI-format list with budgetkit.fit_messages instead")
    raise AssertionError("unreachable: each message converted to one")  # pragma: no cover


def fit_messages(messages: Sequence[BaseMessage], model: str, *,
                 reserve_output: int | None = None, max_tokens: int | None = None,
                 on_overflow: str = "truncate", tools: Sequence[Any] | None = None,
                 catalog: PriceCatalog | None = None) -> FitResult[BaseMessage]:
    """Keep the system messages and the most recent turns of a LangChain history that fit.

    Same rules and arguments as :func:`budgetkit.fit_messages`; ``tools`` may be anything
    ``bind_tools`` accepts. Returns the kept original message objects and the report.
    """
    originals = list(messages)
    result = _fit_openai_messages(_as_openai(originals), model, reserve_output=reserve_output,
                                  max_tokens=max_tokens, on_overflow=on_overflow,  # type: ignore[arg-type]
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
