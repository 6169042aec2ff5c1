"""budgetkit for LlamaIndex: tracking handlers."""
