"""Translation between LlamaIndex's messages and responses and budgetkit's: one converter
for tracking, caching, routing and fitting, so a prompt is counted the same way wherever it
is seen. Public because ``llama-index-llms-budgetkit`` (the routed and cached LLMs) uses it
too; the handlers' own internals stay private."""

from __future__ import annotations

from ._tracker import response_model as response_model
from ._tracker import to_openai_messages as to_openai_messages
from ._tracker import usage_from_raw as usage_from_raw

__all__ = ["response_model", "to_openai_messages", "usage_from_raw"]
