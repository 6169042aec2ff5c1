"""The token counts of one provider call, as the framework adapters hand them to the engine.

Shared by the LangChain and LlamaIndex handlers (each parses its framework's usage shape
into a :class:`Usage`); framework-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

__all__ = ["Usage", "UsageCounts"]


class UsageCounts(TypedDict):
    """A :class:`Usage` as keyword arguments of ``Engine.settle`` / ``Engine.record``."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call in budgetkit's convention (details inside the totals)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def settle_kwargs(self) -> UsageCounts:
        """The counts as keyword arguments of ``Engine.settle`` / ``Engine.record``."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cached_input_tokens": self.cached_input_tokens,
                "cache_write_tokens": self.cache_write_tokens,
                "reasoning_tokens": self.reasoning_tokens}
