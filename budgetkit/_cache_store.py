"""How the response cache reads and writes its rows (``budgetkit_cache_entry``).

Loading selects plain columns with a textual query, so no ORM object and no per-row
type processing is built: the embedding bytes become one numpy array per row. The
response itself is not loaded at start; it is read on the first hit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select, text, update

from ._cache_tables import CacheEntryRow
from ._store import Store, iter_chunks

__all__ = ["Entry", "CacheRows"]


class _Unloaded:
    def __repr__(self) -> str:
        return "<not loaded>"


UNLOADED: Any = _Unloaded()


class Entry:
    """One cached answer held in memory (the response may still be in the database)."""

    __slots__ = ("seq", "key", "namespace", "model", "price_model", "params_hash",
                 "context_hash", "focus", "embedder", "task_type", "created_at",
                 "expires_at", "hit_count", "cost_nanos", "input_tokens", "output_tokens",
                 "vector", "value", "source")

    def __init__(self, *, key: str, namespace: str, model: str, price_model: str | None,
                 params_hash: str, context_hash: str, focus: str, task_type: str | None,
                 created_at: dt.datetime | None, expires_at: Any, cost_nanos: int,
                 input_tokens: int, output_tokens: int, vector: np.ndarray | None,
                 value: Any = UNLOADED, seq: int | None = None, hit_count: int = 0,
                 embedder: str | None = None) -> None:
        self.seq = seq
        self.key = key
        self.namespace = namespace
        self.model = model
        self.price_model = price_model
        self.params_hash = params_hash
        self.context_hash = context_hash
        self.focus = focus
        self.embedder = embedder
        self.task_type = task_type
        self.created_at = created_at
        self.expires_at = expires_at
        self.hit_count = hit_count
        self.cost_nanos = cost_nanos
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.vector = vector
        self.value = value
        #: (block, row) of the vector in :attr:`Loaded.blocks` for entries read in bulk
        self.source: tuple[int, int] | None = None

    @classmethod
    def from_row(cls, seq: int, key: str, namespace: str, model: str, params_hash: str,
                 context_hash: str, focus: str, embedder: str | None, expires_at: Any,
                 source: tuple[int, int] | None) -> Entry:
        """An entry read at start: only what lookups compare (the hot loop of a load)."""
        entry = cls.__new__(cls)
        entry.seq, entry.key, entry.namespace, entry.model = seq, key, namespace, model
        entry.params_hash, entry.context_hash, entry.focus = params_hash, context_hash, focus
        entry.embedder, entry.expires_at, entry.source = embedder, expires_at, source
        entry.price_model = entry.task_type = entry.created_at = entry.vector = None
        entry.hit_count = entry.cost_nanos = entry.input_tokens = entry.output_tokens = 0
        entry.value = UNLOADED
        return entry

    @property
    def partition(self) -> tuple[str, str, str, str, str]:
        """Entries are only ever compared inside one partition."""
        return (self.namespace, self.model, self.params_hash, self.context_hash,
                self.embedder or "")

    def expired(self, now: dt.datetime) -> bool:
        if self.expires_at is None:
            return False
        if not isinstance(self.expires_at, dt.datetime):  # parsed on first use, not at load
            self.expires_at = _as_datetime(self.expires_at)
        return now >= self.expires_at  # type: ignore[operator]


def _vectors_of(blobs: list[bytes | None]
                ) -> tuple[list[np.ndarray], list[tuple[int, int] | None]]:
    """One matrix per vector size from the raw bytes, and (matrix, row) per blob.

    One ``b"".join`` + ``frombuffer`` instead of a small array per row: loading 100k
    vectors this way is a single copy.
    """
    sources: list[tuple[int, int] | None] = [None] * len(blobs)
    by_size: dict[int, list[int]] = {}
    for position, blob in enumerate(blobs):
        if blob:
            by_size.setdefault(len(blob), []).append(position)
    blocks = []
    for size, positions in by_size.items():
        joined = bytearray().join([blobs[i] for i in positions])  # type: ignore[misc]
        # a bytearray is writable, so the index can adopt the matrix without a copy
        blocks.append(np.frombuffer(joined, dtype=np.float32).reshape(len(positions),
                                                                     size // 4))
        for row, position in enumerate(positions):
            sources[position] = (len(blocks) - 1, row)
    return blocks, sources


def _as_datetime(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


class Loaded(list):  # type: ignore[type-arg]
    """Entries read from the database, with their vectors as a few contiguous matrices."""

    blocks: list[np.ndarray]


class CacheRows:
    """The cache's database operations, over a :class:`Store`."""

    GONE: Any = object()  # a row another process deleted

    def __init__(self, store: Store | Any) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.store.create_tables()
        self.table = CacheEntryRow.__table__  # type: ignore[attr-defined]

    def load(self, now: dt.datetime, *, limit: int | None = None,
             after_seq: int = 0) -> Loaded:
        """Unexpired entries (newest first when limited), without their responses."""
        # Only what a lookup compares; the rest (response, cost, tokens ...) is read by
        # touch() on a hit.
        sql = ("SELECT seq, key, namespace, model, params_hash, context_hash, focus, "
               "embedder, embedding, expires_at FROM budgetkit_cache_entry "
               "WHERE seq > :after AND (expires_at IS NULL OR expires_at > :now) "
               "ORDER BY seq DESC")
        params: dict[str, Any] = {"after": after_seq, "now": now}
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = limit
        with self.store.engine.connect() as conn:
            if self.store.is_sqlite:  # the driver's own rows: no per-row wrapping
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                try:
                    cursor.execute(sql, {**params, "now": now.strftime("%Y-%m-%d %H:%M:%S.%f")})
                    rows = cursor.fetchall()
                finally:
                    cursor.close()
            else:
                rows = list(conn.execute(text(sql), params).fetchall())
        rows.reverse()  # oldest first: LRU order
        entries = Loaded()
        entries.blocks, sources = _vectors_of([row[8] for row in rows])
        from_row = Entry.from_row
        entries.extend(
            from_row(seq, key, namespace, model, params_hash, context_hash, focus, embedder,
                     expires_at, source)
            for source, (seq, key, namespace, model, params_hash, context_hash, focus,
                         embedder, _, expires_at) in zip(sources, rows))
        return entries

    def upsert(self, entry: Entry, embedder: str | None) -> int:
        """Write ``entry`` (replacing a row with the same key); returns its ``seq``."""
        values = {
            "key": entry.key, "namespace": entry.namespace, "model": entry.model,
            "price_model": entry.price_model, "params_hash": entry.params_hash,
            "context_hash": entry.context_hash, "focus": entry.focus, "embedder": embedder,
            "embedding": (np.ascontiguousarray(entry.vector, dtype=np.float32).tobytes()
                          if entry.vector is not None else None),
            "response": entry.value, "task_type": entry.task_type,
            "created_at": entry.created_at, "expires_at": entry.expires_at,
            "hit_count": 0, "cost_nanos": entry.cost_nanos,
            "input_tokens": entry.input_tokens, "output_tokens": entry.output_tokens,
        }
        with self.store.engine.begin() as conn:
            conn.execute(delete(self.table).where(self.table.c.key == entry.key))
            result = conn.execute(insert(self.table).values(**values))
            return int(result.inserted_primary_key[0])

    def touch(self, entry: Entry, now: dt.datetime) -> Any:
        """Count a hit and fill ``entry`` from its row; returns the stored response, or
        :attr:`GONE` if another process deleted the row."""
        table = self.table
        with self.store.engine.begin() as conn:
            result = conn.execute(update(table).where(table.c.key == entry.key).values(
                hit_count=table.c.hit_count + 1, last_hit_at=now))
            if not result.rowcount:
                return self.GONE
            row = conn.execute(select(
                table.c.response, table.c.price_model, table.c.task_type, table.c.created_at,
                table.c.cost_nanos, table.c.input_tokens, table.c.output_tokens,
                table.c.hit_count).where(table.c.key == entry.key)).one()
        (response, entry.price_model, entry.task_type, entry.created_at, entry.cost_nanos,
         entry.input_tokens, entry.output_tokens, entry.hit_count) = row
        return response

    def delete_keys(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        with self.store.engine.begin() as conn:
            for chunk in iter_chunks(keys, 500):
                conn.execute(delete(self.table).where(self.table.c.key.in_(chunk)))

    def delete_where(self, *, namespace: str | None = None, model: str | None = None) -> None:
        statement = delete(self.table)
        if namespace is not None:
            statement = statement.where(self.table.c.namespace == namespace)
        if model is not None:
            statement = statement.where(self.table.c.model == model)
        with self.store.engine.begin() as conn:
            conn.execute(statement)

    def delete_expired(self, now: dt.datetime) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(delete(self.table).where(self.table.c.expires_at <= now))
