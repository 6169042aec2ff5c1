"""What was spent: the store (SQLModel over SQLite or PostgreSQL), the usage tables and
their rollups, the batch writer and its journal, the queue of deferred bookkeeping, and
one call's way into a row: :class:`UsageRecorder` turns each :class:`Ticket` into one
:class:`UsageRecord`.

Built on :mod:`budgetkit.pricing`; knows nothing of budgets, cache or routing.
"""

from __future__ import annotations

from ._deferred import DeferredJobs as DeferredJobs
from ._journal import open_journal as open_journal
from ._recorder import CallCounter as CallCounter
from ._recorder import Status as Status
from ._recorder import UsageRecorder as UsageRecorder
from ._recorder import UsageSource as UsageSource
from ._recorder import utcnow as utcnow
from ._store import Store as Store
from ._store import default_db_url as default_db_url
from ._store import iter_chunks as iter_chunks
from ._tables import OPERATION_TYPES as OPERATION_TYPES
from ._tables import STATUSES as STATUSES
from ._tables import UsageRow as UsageRow
from ._tables import UsageTagRow as UsageTagRow
from ._tables import table_of as table_of
from ._ticket import Ticket as Ticket
from ._ticket import UsageRecord as UsageRecord
from ._ticket import messages_text as messages_text
from ._ticket import new_id as new_id
from ._ticket import prompt_hash as prompt_hash
from ._ticket import redact_preview as redact_preview
from ._ticket import snapshot_messages as snapshot_messages
from ._usage import Usage as Usage
from ._writer import BatchWriter as BatchWriter

__all__ = ['Store', 'default_db_url', 'iter_chunks', 'UsageRow', 'UsageTagRow',
           'OPERATION_TYPES', 'STATUSES', 'Ticket', 'UsageRecord', 'messages_text', 'new_id',
           'prompt_hash', 'redact_preview', 'snapshot_messages', 'Usage', 'BatchWriter',
           'open_journal', 'table_of', 'DeferredJobs', 'UsageRecorder', 'CallCounter', 'Status',
           'UsageSource', 'utcnow']
