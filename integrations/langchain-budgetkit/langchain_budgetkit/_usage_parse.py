"""Reading what LangChain reports about a model call: usage, and values fit for a JSON column.

Shared by the callback handlers and the routed model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from budgetkit.ledger import Usage

__all__ = ["usage_from_metadata", "usage_from_openai", "first_value", "json_safe",
           "tool_call_text"]


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _is(key: str, name: str) -> bool:
    """``key`` is ``name`` or a service tier's spelling of it (``priority_cache_read``)."""
    return key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "_")


def usage_from_metadata(usage: Mapping[str, Any] | None) -> Usage | None:
    """Read LangChain's ``usage_metadata`` (``None`` when it reports nothing).

    ``cache_read`` → cached input, ``cache_creation`` → cache writes (Anthropic's
    ``ephemeral_5m_input_tokens`` / ``ephemeral_1h_input_tokens`` instead when present, so
    writes are counted once), ``reasoning`` → reasoning tokens. OpenAI's priority and flex
    tiers prefix these keys with the tier name; both spellings are read.
    """
    if not usage:
        return None
    input_tokens = _int(usage.get("input_tokens"))
    output_tokens = _int(usage.get("output_tokens"))
    if not input_tokens and not output_tokens:
        return None  # fakes and some streams report zeros: nothing was measured
    cached = created = ephemeral = reasoning = 0
    for key, value in (usage.get("input_token_details") or {}).items():
        if value and isinstance(value, int):
            if _is(key, "cache_read"):
                cached += value
            elif _is(key, "cache_creation"):
                created += value
            elif key.startswith("ephemeral_") and key.endswith("_input_tokens"):
                ephemeral += value
    for key, value in (usage.get("output_token_details") or {}).items():
        if value and isinstance(value, int) and _is(key, "reasoning"):
            reasoning += value
    # The details are parts of the totals; never let a provider quirk exceed them.
    cached = min(cached, input_tokens)
    cache_write = min(ephemeral or created, input_tokens - cached)
    return Usage(input_tokens, output_tokens, cached, cache_write, min(reasoning, output_tokens))


def usage_from_openai(token_usage: Mapping[str, Any] | None) -> Usage | None:
    """Read an OpenAI-style ``token_usage`` dict (legacy LLMs' ``llm_output``)."""
    if not token_usage:
        return None
    prompt = _int(token_usage.get("prompt_tokens") or token_usage.get("input_tokens"))
    completion = _int(token_usage.get("completion_tokens") or token_usage.get("output_tokens"))
    if not prompt and not completion:
        return None
    prompt_details = token_usage.get("prompt_tokens_details") or {}
    completion_details = token_usage.get("completion_tokens_details") or {}
    cached = min(_int(prompt_details.get("cached_tokens")), prompt)
    return Usage(prompt, completion, cached, 0,
                 min(_int(completion_details.get("reasoning_tokens")), completion))


def first_value(mapping: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The first truthy value of ``keys`` in ``mapping`` (``None`` when there is none)."""
    for key in keys:
        value = mapping.get(key)
        if value:
            return value
    return None


def json_safe(value: Any, depth: int = 0) -> Any:
    """Metadata goes to a JSON column: keep JSON values, stringify the rest."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if depth < 4 and isinstance(value, Mapping):
        return {str(key): json_safe(item, depth + 1) for key, item in value.items()}
    if depth < 4 and isinstance(value, (list, tuple)):
        return [json_safe(item, depth + 1) for item in value]
    return str(value)


def tool_call_text(generation: Any) -> str:
    message = getattr(generation, "message", None)
    calls = getattr(message, "tool_calls", None) or ()
    return "".join(call.get("name", "") + json.dumps(call.get("args", {}), separators=(",", ":"))
                   for call in calls)
