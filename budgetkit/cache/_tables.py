"""SQLModel table of the response cache: one row per cached answer.

The embedding is kept as raw float32 bytes, so loading 100k entries at start is one
``SELECT`` of a few columns (no ORM objects) and one ``numpy.frombuffer`` per row.
``seq`` only grows, so a process can pick up entries other processes added since its
last look (``WHERE seq > :seen``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, LargeBinary, Text
from sqlmodel import Field, SQLModel

__all__ = ["CacheEntryRow", "CachePartitionRow"]


class CachePartitionRow(SQLModel, table=True):
    """Entries are compared only within one partition; there are few of them."""

    __tablename__ = "budgetkit_cache_partition"

    id: Optional[int] = Field(default=None, primary_key=True)
    #: sha256 of the five fields below.
    hash: str = Field(max_length=64, unique=True)
    namespace: str = Field(max_length=200)
    model: str = Field(sa_column=Column(Text, nullable=False))
    params_hash: str = Field(max_length=64)
    context_hash: str = Field(max_length=64)
    embedder: str = Field(default="", max_length=200)


class CacheEntryRow(SQLModel, table=True):
    """A cached response and what it cost to produce."""

    __tablename__ = "budgetkit_cache_entry"
    __table_args__ = (
        Index("ix_budgetkit_cache_ns_model", "namespace", "model"),
        Index("ix_budgetkit_cache_expires", "expires_at"),
    )

    seq: Optional[int] = Field(default=None, primary_key=True)
    #: sha256 of namespace, model, canonical prompt or messages and answer-changing params.
    key: str = Field(max_length=64, unique=True, index=True)
    namespace: str = Field(max_length=200)
    #: The model identity (for LangChain the ``llm_string``); may be long.
    model: str = Field(sa_column=Column(Text, nullable=False))
    #: Catalog name used to price the saving, when known.
    price_model: Optional[str] = Field(default=None, max_length=200)
    #: The row of :class:`CachePartitionRow` (namespace, model, parameters, context,
    #: embedder): loading reads this integer instead of five strings per entry.
    partition_id: int = Field(index=True)
    #: sha256 of the answer-changing parameters (the semantic index is split by it).
    params_hash: str = Field(max_length=64)
    #: sha256 of the conversation before the last user message ("" for a plain prompt).
    #: Semantic matches need the same context: the index is split by it too.
    context_hash: str = Field(max_length=64)
    #: The text compared semantically: the prompt, or the last user message.
    focus: str = Field(sa_column=Column(Text, nullable=False))
    embedder: Optional[str] = Field(default=None, max_length=200)
    embedding: Optional[bytes] = Field(default=None, sa_column=Column(LargeBinary))
    #: The cached value (any JSON value; framework adapters store serialized objects).
    response: Any = Field(default=None, sa_column=Column(JSON))
    task_type: Optional[str] = Field(default=None, max_length=64)
    # Naive UTC in plain DateTime columns, like the usage ledger.
    created_at: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))
    expires_at: Optional[dt.datetime] = Field(default=None, sa_column=Column(DateTime))
    last_hit_at: Optional[dt.datetime] = Field(default=None, sa_column=Column(DateTime))
    hit_count: int = 0
    cost_nanos: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    input_tokens: int = 0
    output_tokens: int = 0
