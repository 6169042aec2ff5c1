"""Cache keys: a prompt or message list reduced to what the response cache compares.

The exact key is a sha256 over the namespace, the model identity, the canonical prompt or
messages and the parameters that can change an answer. The semantic layer compares the
*focus* (the prompt, or the last user message) inside a partition: namespace, model,
parameters and the conversation before the last user message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigurationError

__all__ = ["CacheRequest", "make_request", "canonical_json"]

# Parameters that never change an answer, so they stay out of the key.
_IGNORED_PARAMS = frozenset({
    "stream", "stream_options", "timeout", "request_timeout", "max_retries", "user",
    "metadata", "tags", "callbacks", "run_name", "run_id", "api_key", "base_url",
    "api_base", "organization", "headers", "extra_headers", "http_client",
})
_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")


@dataclass(frozen=True)
class CacheRequest:
    """A prompt reduced to what the cache compares."""

    namespace: str
    model: str
    key: str
    params_hash: str
    context_hash: str
    focus: str | None  # None: only exact lookups (no user message to compare)

    def partition(self, embedder: str) -> tuple[str, str, str, str, str]:
        return (self.namespace, self.model, self.params_hash, self.context_hash, embedder)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=repr)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [part.get("text", "") if isinstance(part, Mapping) else str(part)
                 for part in content]
        return "\n".join(part for part in parts if part)
    return "" if content is None else str(content)


def _canonical_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    canonical = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ConfigurationError(
                f"messages[{index}] must be a dict with 'role' and 'content', got "
                f"{type(message).__name__}")
        canonical.append({field: message[field] for field in _MESSAGE_FIELDS
                          if message.get(field) is not None})
    return canonical


def make_request(*, namespace: str, model: str, prompt: str | None = None,
                 messages: Sequence[Mapping[str, Any]] | None = None,
                 params: Mapping[str, Any] | None = None) -> CacheRequest:
    """Canonicalise one lookup; raises :class:`ConfigurationError` for bad input."""
    if not namespace or not isinstance(namespace, str):
        raise ConfigurationError(f"namespace must be a non-empty string, got {namespace!r}")
    if not model or not isinstance(model, str):
        raise ConfigurationError(f"model must be a non-empty string, got {model!r}")
    if (prompt is None) == (messages is None):
        raise ConfigurationError("give exactly one of prompt= or messages=")
    kept = {name: value for name, value in (params or {}).items()
            if name not in _IGNORED_PARAMS and value is not None}
    params_text = canonical_json(kept)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ConfigurationError(f"prompt must be a string, got {type(prompt).__name__}")
        body: Any = {"prompt": prompt}
        context_hash, focus = "", prompt
    else:
        canonical = _canonical_messages(messages or [])
        if not canonical:
            raise ConfigurationError("messages must not be empty")
        body = {"messages": canonical}
        last = canonical[-1]
        if last["role"] == "user":
            focus = _text_of(last.get("content"))
            context_hash = _sha(canonical_json(canonical[:-1])) if len(canonical) > 1 else ""
        else:  # ends with a tool result or an assistant turn: exact matches only
            focus, context_hash = None, _sha(canonical_json(canonical))
    key = _sha(canonical_json({"namespace": namespace, "model": model, "params": kept, **body}))
    return CacheRequest(namespace=namespace, model=model, key=key,
                    params_hash=_sha(params_text), context_hash=context_hash, focus=focus)
