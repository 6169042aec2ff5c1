"""budgetkit for LangChain."""
from ._cache import BudgetkitCache as BudgetkitCache
from ._callback_async import AsyncBudgetkitCallbackHandler as AsyncBudgetkitCallbackHandler
from ._callback import BudgetkitCallbackHandler as BudgetkitCallbackHandler
from ._callback import get_budgetkit_callback as get_budgetkit_callback
from ._embeddings import MeteredEmbeddings as MeteredEmbeddings
from ._fitting import fit_messages as fit_messages
from ._routed import RoutedChatModel as RoutedChatModel
