"""budgetkit for LlamaIndex: the instrumentation event handler (current hook), the legacy
callback handler, per-run attribution and message fitting. ``.messages`` holds the message
and usage converters the llms package shares."""

from __future__ import annotations

from ._context import attribution as attribution
from ._context import current_attribution as current_attribution
from ._events import BudgetkitEventHandler as BudgetkitEventHandler
from ._fitting import fit_messages as fit_messages
from ._legacy import BudgetkitCallbackHandler as BudgetkitCallbackHandler

__version__ = "0.1.0"
__all__ = ["BudgetkitCallbackHandler", "BudgetkitEventHandler", "attribution",
           "current_attribution", "fit_messages", "__version__"]
