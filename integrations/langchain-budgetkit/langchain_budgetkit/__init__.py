"""budgetkit for LangChain."""
