"""What a token costs and how many tokens a text is: the price catalog, offline token
counting (tiktoken with bundled BPE files) and integer money helpers.

The bottom layer: it imports nothing of budgetkit but :mod:`budgetkit.errors`.
"""

from __future__ import annotations

from ._catalog import ModelBudget as ModelBudget
from ._catalog import ModelPrice as ModelPrice
from ._catalog import PriceCatalog as PriceCatalog
from ._catalog import default_catalog as default_catalog
from ._catalog import estimate_cost as estimate_cost
from ._catalog import get_embedding_budget as get_embedding_budget
from ._catalog import get_generation_budget as get_generation_budget
from ._counts import finite_number as finite_number
from ._counts import nonnegative_int as nonnegative_int
from ._counts import token_count as token_count
from ._long_text import count_long_text as count_long_text
from ._long_text import encode_long_text as encode_long_text
from ._money import PICOS_PER_NANO as PICOS_PER_NANO
from ._money import format_usd as format_usd
from ._money import nanos_to_decimal as nanos_to_decimal
from ._money import nanos_to_usd as nanos_to_usd
from ._money import usd_to_nanos as usd_to_nanos
from ._tokens import ESTIMATE_ENCODING as ESTIMATE_ENCODING
from ._tokens import chunk_text as chunk_text
from ._tokens import count_message_tokens as count_message_tokens
from ._tokens import count_tokens as count_tokens
from ._tokens import count_tool_tokens as count_tool_tokens
from ._tokens import encoding_for_model as encoding_for_model
from ._tokens import is_exact as is_exact
from ._tokens import message_tokens_bound as message_tokens_bound
from ._tokens import text_tokens_bound as text_tokens_bound
from ._tokens import tool_counts_are_exact as tool_counts_are_exact

__all__ = ['ModelPrice', 'ModelBudget', 'PriceCatalog', 'default_catalog', 'estimate_cost',
           'get_generation_budget', 'get_embedding_budget', 'count_tokens',
           'count_message_tokens', 'count_tool_tokens', 'chunk_text', 'encoding_for_model',
           'is_exact', 'tool_counts_are_exact', 'ESTIMATE_ENCODING', 'message_tokens_bound',
           'text_tokens_bound',
           'PICOS_PER_NANO', 'format_usd', 'nanos_to_usd', 'usd_to_nanos', 'nanos_to_decimal',
           'token_count', 'nonnegative_int', 'finite_number', 'count_long_text',
           'encode_long_text']
