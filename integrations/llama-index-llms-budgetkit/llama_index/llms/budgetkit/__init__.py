"""budgetkit for LlamaIndex: the routed LLM."""
from ._routed import RoutedLLM as RoutedLLM
from ._cached import CachedLLM as CachedLLM
