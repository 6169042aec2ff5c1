"""budgetkit for LlamaIndex: the routed LLM (router, cascade, fallback, fitting) and the
cached LLM (exact and semantic response cache)."""

from __future__ import annotations

from ._cached import CachedLLM as CachedLLM
from ._routed import RoutedLLM as RoutedLLM

__version__ = "0.1.0"
__all__ = ["CachedLLM", "RoutedLLM", "__version__"]
