"""budgetkit for LlamaIndex: the routed LLM."""
from ._routed import RoutedLLM as RoutedLLM
