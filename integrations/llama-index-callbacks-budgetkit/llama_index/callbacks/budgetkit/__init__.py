"""budgetkit for LlamaIndex: tracking handlers."""
from ._fitting import fit_messages as fit_messages
from ._context import attribution as attribution
from ._events import BudgetkitEventHandler as BudgetkitEventHandler
from ._legacy import BudgetkitCallbackHandler as BudgetkitCallbackHandler
