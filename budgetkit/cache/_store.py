"""How the response cache reads and writes its rows (``budgetkit_cache_entry``).

Loading selects plain columns with a textual query, so no ORM object and no per-row
type processing is built: the embedding bytes become one numpy array per row. The
response itself is not loaded at start; it is read on the first hit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from sqlalchemy import bindparam, delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from budgetkit.ledger import Store, iter_chunks

from ._tables import CacheEntryRow, CachePartitionRow

__all__ = ["Entry", "CacheRows"]


class _Unloaded:
    def __repr__(self) -> str:
        return "<not loaded>"


UNLOADED: Any = _Unloaded()


class Entry:
    """One cached answer held in memory.

    Entries read at start carry only what finding them needs (key, partition, vector);
    the prompt text, expiry and cost are read from the database when the entry becomes a
    candidate or a hit (:meth:`CacheRows.fill`, :meth:`CacheRows.touch`).
    """

    __slots__ = ("seq", "key", "partition", "focus", "expires_at", "price_model",
                 "task_type", "created_at", "hit_count", "cost_nanos", "input_tokens",
                 "output_tokens", "vector", "value", "source")

    def __init__(self, *, key: str, namespace: str, model: str, price_model: str | None,
                 params_hash: str, context_hash: str, focus: str, task_type: str | None,
                 created_at: dt.datetime | None, expires_at: Any, cost_nanos: int,
                 input_tokens: int, output_tokens: int, vector: np.ndarray | None,
                 value: Any = UNLOADED, seq: int | None = None, hit_count: int = 0,
                 embedder: str | None = None) -> None:
        self.seq = seq
        self.key = key
        #: Entries are only ever compared inside one partition:
        #: (namespace, model, params hash, context hash, embedder).
        self.partition = (namespace, model, params_hash, context_hash, embedder or "")
        self.focus = focus
        self.price_model = price_model
        self.task_type = task_type
        self.created_at = created_at
        self.expires_at = expires_at
        self.hit_count = hit_count
        self.cost_nanos = cost_nanos
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.vector = vector
        self.value = value
        #: Position in :class:`Loaded` for entries read in bulk (finds the vector)
        self.source: int | None = None

    @classmethod
    def from_row(cls, seq: int, key: str, partition: tuple[str, str, str, str, str],
                 source: int) -> Entry:
        """An entry read at start (the hot loop of a load: four fields, nothing parsed)."""
        entry = cls.__new__(cls)
        entry.seq, entry.key, entry.partition, entry.source = seq, key, partition, source
        entry.focus = entry.expires_at = UNLOADED
        return entry  # the other fields read as their defaults until touch() fills them

    def __getattr__(self, name: str) -> Any:
        """Defaults of the fields an entry read at start does not set (only called for
        unset slots, so it costs nothing once they are filled)."""
        try:
            return _DETAIL_DEFAULTS[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def namespace(self) -> str:
        return self.partition[0]

    @property
    def model(self) -> str:
        return self.partition[1]

    @property
    def params_hash(self) -> str:
        return self.partition[2]

    @property
    def context_hash(self) -> str:
        return self.partition[3]

    @property
    def embedder(self) -> str | None:
        return self.partition[4] or None

    @property
    def loaded(self) -> bool:
        """Whether the prompt text and expiry are in memory."""
        return self.focus is not UNLOADED

    def expired(self, now: dt.datetime) -> bool:
        """Expired by what is known; an entry whose expiry is not loaded yet is checked
        by the database when it is served (:meth:`CacheRows.touch`)."""
        if self.expires_at is None or self.expires_at is UNLOADED:
            return False
        if not isinstance(self.expires_at, dt.datetime):
            self.expires_at = _as_datetime(self.expires_at)
        return now >= self.expires_at


_DETAIL_DEFAULTS: dict[str, Any] = {
    "price_model": None, "task_type": None, "created_at": None, "vector": None,
    "value": UNLOADED, "hit_count": 0, "cost_nanos": 0, "input_tokens": 0, "output_tokens": 0}


def partition_hash(partition: tuple[str, str, str, str, str]) -> str:
    return hashlib.sha256("\x1f".join(partition).encode("utf-8", "surrogatepass")).hexdigest()


def _vectors_of(blobs: list[bytes | None]
                ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """One matrix per vector size from the raw bytes, and per blob its matrix and row
    (matrix -1: no vector).

    One ``join`` + ``frombuffer`` instead of a small array per row: loading 100k vectors
    this way is a single copy.
    """
    sizes = np.fromiter((len(blob) if blob else 0 for blob in blobs), dtype=np.int64,
                        count=len(blobs))
    block_of = np.full(len(blobs), -1, dtype=np.int64)
    row_of = np.zeros(len(blobs), dtype=np.int64)
    blocks = []
    for size in np.unique(sizes[sizes > 0]).tolist():
        positions = np.flatnonzero(sizes == size)
        if len(positions) == len(blobs):
            parts: list[Any] = blobs
        else:
            parts = [blobs[i] for i in positions.tolist()]
        # a bytearray is writable, so the index can adopt the matrix without a copy
        joined = bytearray().join(parts)
        blocks.append(np.frombuffer(joined, dtype=np.float32).reshape(len(positions),
                                                                     size // 4))
        block_of[positions] = len(blocks) - 1
        row_of[positions] = np.arange(len(positions))
    return blocks, block_of, row_of


def _as_datetime(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


class Loaded(list):  # type: ignore[type-arg]
    """Entries read from the database, with their vectors as a few contiguous matrices:
    the vector of the entry at position ``i`` is ``blocks[block_of[i]][row_of[i]]``."""

    blocks: list[np.ndarray]
    block_of: np.ndarray
    row_of: np.ndarray


class CacheRows:
    """The cache's database operations, over a :class:`Store`."""

    GONE: Any = object()  # a row another process deleted

    def __init__(self, store: Store | Any) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.store.create_tables()
        self.table = CacheEntryRow.__table__  # type: ignore[attr-defined]
        self.partitions = CachePartitionRow.__table__  # type: ignore[attr-defined]
        self._partitions: dict[int, tuple[str, str, str, str, str]] = {}
        # The statements of every hit, built once: building them per call (expressions,
        # cache keys) was a third of an in-process lookup's CPU time.
        table = self.table
        self._fill_sql = (select(table.c.seq, table.c.focus, table.c.expires_at)
                          .where(table.c.seq.in_(bindparam("seqs", expanding=True))))
        self._touch_sql = (update(table).where(
            (table.c.key == bindparam("hit_key"))
            & (table.c.expires_at.is_(None) | (table.c.expires_at > bindparam("now"))))
            .values(hit_count=table.c.hit_count + 1, last_hit_at=bindparam("now")))
        self._hit_sql = select(
            table.c.response, table.c.price_model, table.c.task_type, table.c.created_at,
            table.c.cost_nanos, table.c.input_tokens, table.c.output_tokens,
            table.c.hit_count, table.c.focus, table.c.expires_at).where(
            table.c.key == bindparam("hit_key"))

    def load(self, now: dt.datetime, *, limit: int | None = None,
             after_seq: int = 0) -> Loaded:
        """Unexpired entries (newest first when limited), without their responses."""
        # Per row only the key, the partition id and the vector: a few Python objects per
        # entry. The partitions are few, in their own table; the prompt text, expiry and
        # cost are read for candidates and hits.
        params: dict[str, Any] = {"after": after_seq, "now": now}
        rows_sql = ("SELECT seq, key, partition_id, embedding FROM budgetkit_cache_entry "
                    "WHERE seq > :after AND (expires_at IS NULL OR expires_at > :now) "
                    "ORDER BY seq DESC")
        if limit is not None:
            rows_sql += " LIMIT :limit"
            params["limit"] = limit
        with self.store.engine.connect() as conn:
            for row in self._fetch(conn, "SELECT id, namespace, model, params_hash, "
                                   "context_hash, embedder FROM budgetkit_cache_partition "
                                   "WHERE id > :seen", {"seen": max(self._partitions, default=0)}):
                self._partitions[row[0]] = (row[1], row[2], row[3], row[4], row[5] or "")
            rows = self._fetch(conn, rows_sql, params)
        rows.reverse()  # oldest first: LRU order
        entries = Loaded()
        entries.blocks, entries.block_of, entries.row_of = _vectors_of([row[3] for row in rows])
        partitions, from_row = self._partitions, Entry.from_row
        entries.extend(from_row(seq, key, partitions[part], position)
                       for position, (seq, key, part, _) in enumerate(rows))
        return entries

    def _fetch(self, conn: Any, sql: str, params: dict[str, Any]) -> list[Any]:
        if self.store.is_sqlite:  # the driver's own rows: no per-row wrapping
            cursor = conn.connection.driver_connection.cursor()
            try:
                if "now" in params:  # compared as text, so formatted as SQLAlchemy stores it
                    params = {**params, "now": params["now"].strftime("%Y-%m-%d %H:%M:%S.%f")}
                cursor.execute(sql, params)
                return list(cursor.fetchall())
            finally:
                cursor.close()
        return list(conn.execute(text(sql), params).fetchall())

    def fill(self, entries: Iterable[Entry]) -> list[Entry]:
        """Read prompt text and expiry for entries loaded without them; returns the
        entries whose rows are gone (another process deleted them)."""
        missing = {entry.seq: entry for entry in entries if not entry.loaded}
        if not missing:
            return []
        found: set[int] = set()
        with self.store.engine.connect() as conn:
            for chunk in iter_chunks(list(missing), 500):
                for seq, focus, expires_at in conn.execute(self._fill_sql,
                                                           {"seqs": list(chunk)}):
                    entry = missing[seq]
                    entry.focus, entry.expires_at = focus, expires_at
                    found.add(seq)
        return [entry for seq, entry in missing.items() if seq not in found]

    def upsert(self, entry: Entry, embedder: str | None,
               also: Callable[[Any, int, int], None] | None = None) -> int:
        """Write ``entry`` (replacing a row with the same key); returns its ``seq``.

        ``also(connection, seq, partition_id)`` runs in the same transaction (the pgvector
        backend writes the vector there, so no process sees the entry without it).
        """
        partition_id = self._partition_id(entry.partition)
        values = {
            "key": entry.key, "partition_id": partition_id,
            "namespace": entry.namespace, "model": entry.model,
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
            inserted = result.inserted_primary_key
            assert inserted is not None  # an INSERT of one row always has its key
            seq = int(inserted[0])
            if also is not None:
                also(conn, seq, partition_id)
            return seq

    def _partition_id(self, partition: tuple[str, str, str, str, str]) -> int:
        for number, known in self._partitions.items():
            if known == partition:
                return number
        digest = partition_hash(partition)
        table = self.partitions
        with self.store.engine.begin() as conn:
            found = conn.execute(select(table.c.id).where(table.c.hash == digest)).scalar()
            if found is None:
                try:
                    with conn.begin_nested():
                        found = conn.execute(insert(table).values(
                            hash=digest, namespace=partition[0], model=partition[1],
                            params_hash=partition[2], context_hash=partition[3],
                            embedder=partition[4])).inserted_primary_key[0]  # type: ignore[index]
                        # (SQLAlchemy types the key Optional; a one-row INSERT always has it)
                except IntegrityError:  # another process inserted it just now
                    found = conn.execute(select(table.c.id)
                                         .where(table.c.hash == digest)).scalar_one()
        self._partitions[int(found)] = partition
        return int(found)

    def touch(self, entry: Entry, now: dt.datetime) -> Any:
        """Count a hit and fill ``entry`` from its row; returns the stored response, or
        :attr:`GONE` if another process deleted the row."""
        params = {"hit_key": entry.key, "now": now}
        with self.store.engine.begin() as conn:
            result = conn.execute(self._touch_sql, params)
            if not result.rowcount:
                return self.GONE
            row = conn.execute(self._hit_sql, params).one()
        (response, entry.price_model, entry.task_type, entry.created_at, entry.cost_nanos,
         entry.input_tokens, entry.output_tokens, entry.hit_count, entry.focus,
         entry.expires_at) = row
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

    def delete_expired(self, now: dt.datetime) -> int:
        with self.store.engine.begin() as conn:
            result = conn.execute(delete(self.table).where(self.table.c.expires_at <= now))
            return int(result.rowcount or 0)
