"""What the router reads of a prompt besides the learned score: token counts per model,
the text of chat messages, and the hand-weighted signals (length, code, reasoning cues,
constraints) that explain a decision in its reason.

``complexity_score`` was the router's score until the learned scorer replaced it (it ranked
prompts worse than "longest first" on every benchmark we measured); it stays public for
explanations and for users who built on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from budgetkit.pricing import PriceCatalog, count_message_tokens, count_tokens

from ._features import _CODE, _CONSTRAINTS, _CUES

__all__ = ["complexity_score", "LENGTH_SATURATION", "prompt_text"]

# The same signals the learned scorer reads (one definition of what counts as code, a
# reasoning cue or a constraint).
_REASONING_CUES = _CUES

# Weights of each signal in the 0..1 score. Length saturates at LENGTH_SATURATION tokens.
_LENGTH_WEIGHT, _CODE_WEIGHT, _CUE_WEIGHT, _CONSTRAINT_WEIGHT = 0.35, 0.25, 0.1, 0.05
_CUE_CAP, _CONSTRAINT_CAP = 0.3, 0.2
LENGTH_SATURATION = 2_000


def complexity_score(text: str, *, tokens: int | None = None) -> tuple[float, dict[str, Any]]:
    """A 0..1 complexity estimate of a prompt and the signals behind it.

    Cheap heuristics, not a model: prompt length (saturating at 2,000 tokens), code,
    reasoning cues ("why", "prove", "step by step", "trade-offs", ...) and the number of
    constraints ("must", "at most", bullet points). ``tokens`` is the counted prompt length
    (the character count / 4 is used when not given).
    """
    if tokens is None:
        tokens = len(text) // 4
    cues = sorted({m.group(0).lower() for m in _REASONING_CUES.finditer(text)})
    constraints = len(_CONSTRAINTS.findall(text))
    has_code = bool(_CODE.search(text))
    score = (_LENGTH_WEIGHT * min(tokens / LENGTH_SATURATION, 1.0)
             + (_CODE_WEIGHT if has_code else 0.0)
             + min(_CUE_WEIGHT * len(cues), _CUE_CAP)
             + min(_CONSTRAINT_WEIGHT * constraints, _CONSTRAINT_CAP))
    signals = {"tokens": tokens, "code": has_code, "reasoning_cues": cues,
               "constraints": constraints}
    return round(min(score, 1.0), 4), signals


class _Counter:
    """Counts the prompt once per model (tokenizers differ between model families)."""

    def __init__(self, catalog: PriceCatalog, prompt: str | None,
                 messages: Sequence[Mapping[str, Any]] | None,
                 tools: Sequence[Mapping[str, Any]] | None) -> None:
        self.catalog, self.prompt, self.messages, self.tools = catalog, prompt, messages, tools
        self._counts: dict[str, int] = {}

    def __call__(self, model: str) -> int:
        count = self._counts.get(model)
        if count is None:
            if self.messages is not None:
                count = count_message_tokens(self.messages, model, tools=self.tools,
                                             catalog=self.catalog)
            else:
                count = count_tokens(self.prompt or "", model, catalog=self.catalog)
            self._counts[model] = count
        return count


def _messages_text(messages: Iterable[Mapping[str, Any]]) -> str:
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content blocks: keep the text ones
            parts.extend(str(block.get("text", "")) for block in content
                         if isinstance(block, Mapping))
    return "\n".join(parts)


def _describe(signals: Mapping[str, Any]) -> str:
    parts = [f"{signals.get('tokens', 0)} tokens"]
    if signals.get("code"):
        parts.append("code")
    cues = signals.get("reasoning_cues") or ()
    if cues:
        parts.append("cues " + "/".join(cues[:4]))
    if signals.get("constraints"):
        parts.append(f"{signals['constraints']} constraints")
    return ", ".join(parts)


def prompt_text(prompt: str | None = None,
                messages: Sequence[Mapping[str, Any]] | None = None) -> str | None:
    """The text the router scores and cascade checks see: ``prompt``, else the text contents
    of OpenAI-format ``messages`` joined by newlines (None when neither is given)."""
    if prompt is not None:
        return prompt
    return _messages_text(messages) if messages is not None else None
