"""budgetkit for LlamaIndex: tracking handlers."""
from ._fitting import fit_messages as fit_messages
