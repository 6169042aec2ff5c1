"""budgetkit for LlamaIndex: the routed LLM."""
