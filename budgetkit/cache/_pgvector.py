"""The cache's vectors in PostgreSQL (pgvector): every process sees every entry at once.

With the in-process index each process keeps a full copy of the vectors and polls the
database for entries other processes added. When the store is PostgreSQL with the
``vector`` extension, this backend keeps them in the database instead: one table per
vector size (``budgetkit_cache_vector_384``: ``seq`` -> the entry row, ``partition_id``,
``embedding vector(384)``) with an HNSW index (``vector_cosine_ops``) and a btree on the
partition. A lookup is one query; an entry another process stored a moment ago is found
by the next lookup, and no process holds the vectors.

Two measured facts shape the queries (``benchmarks/bench_cache_speed.py``, pgvector 0.6):

* pgvector before 0.8 filters *after* the HNSW scan: asking the graph for the 8 nearest
  rows of a partition that holds 50 of 100k rows usually returns none. So partitions of
  up to ``exact_rows`` rows are searched exactly through the partition btree (about 1 us
  a row), larger ones through HNSW with ``hnsw.ef_search`` raised in proportion to how
  small a share of the table they are, and exactly again if that still finds too few.
  Row counts only choose the plan; a stale count can make a query slower, never wrong.
* psycopg prepares a statement after five runs and PostgreSQL may then reuse a generic
  plan that ignores the partition's size (a 35 ms sequential scan for a 50-row
  partition). Partition ids are our own integers, so they are written into the SQL and
  every plan is made for its partition.

Rows leave the vector table with their entry (``ON DELETE CASCADE``): invalidation,
eviction and expiry need no second delete.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from budgetkit.errors import ConfigurationError

from ._store import CacheRows, Entry, partition_hash

__all__ = ["PgVectorEntries", "VectorBackendUnavailable", "VECTOR_BACKENDS", "open_vector_backend",
           "pgvector_status"]

logger = logging.getLogger("budgetkit.cache")

Partition = tuple[str, str, str, str, str]

#: One lock id for the DDL below, so two processes opening at once do not race on
#: CREATE EXTENSION / CREATE TABLE (PostgreSQL raises a duplicate-type error then).
_DDL_LOCK = 0x6275_6467_6B69_7476  # "budgkitv"


class VectorBackendUnavailable(ConfigurationError):
    """``vector_backend="pgvector"`` was asked for and cannot be used (names why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"vector_backend='pgvector' cannot be used: {reason}")
        self.reason = reason


def pgvector_status(rows: CacheRows) -> str | None:
    """``None`` when the store can hold the cache's vectors with pgvector (creating the
    extension if the server has it and we may); otherwise the reason it cannot."""
    store = rows.store
    if store.engine.dialect.name != "postgresql":
        return f"the store is {store.engine.dialect.name}, not PostgreSQL"
    try:
        with store.engine.begin() as conn:
            conn.execute(text(f"SELECT pg_advisory_xact_lock({_DDL_LOCK})"))
            if conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
                            ).scalar() is not None:
                return None
            if conn.execute(text("SELECT 1 FROM pg_available_extensions "
                                 "WHERE name = 'vector'")).scalar() is None:
                return ("the PostgreSQL server has no pgvector extension "
                        "(pg_available_extensions has no 'vector')")
            try:
                with conn.begin_nested():
                    conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
            except DBAPIError as exc:
                return f"CREATE EXTENSION vector failed: {str(exc.orig).strip()}"
    except DBAPIError as exc:
        return f"the database could not be asked: {str(exc.orig).strip()}"
    return None


VECTOR_BACKENDS = ("auto", "local", "pgvector")


def open_vector_backend(rows: CacheRows, choice: str) -> PgVectorEntries | None:
    """The pgvector backend when ``choice`` asks for it and the store can hold it;
    ``None`` for the in-process index.

    ``"auto"`` uses pgvector on a PostgreSQL store that has (or may create) the
    extension and says in the log why not otherwise; ``"pgvector"`` raises
    :class:`VectorBackendUnavailable` instead of falling back; ``"local"`` never asks.
    """
    if choice not in VECTOR_BACKENDS:
        raise ConfigurationError(f"vector_backend must be one of {', '.join(VECTOR_BACKENDS)}, "
                                 f"got {choice!r}")
    if choice == "local" or (choice == "auto" and rows.store.is_sqlite):
        return None
    reason = pgvector_status(rows)
    if reason is None:
        backend = PgVectorEntries(rows)
        threading.Thread(target=backend.backfill_in_background,
                         name="budgetkit-pgvector-backfill", daemon=True).start()
        return backend
    if choice == "pgvector":
        raise VectorBackendUnavailable(reason)
    logger.warning("budgetkit cache: not using pgvector because %s; each process keeps "
                   "its own copy of the vectors and polls for new entries. Install "
                   "pgvector on the server to share one index, or pass "
                   "vector_backend='local' to keep this setup without this message.", reason)
    return None


def _literal(vector: np.ndarray) -> str:
    """pgvector's text form: sent as a plain string, so no client-side type package."""
    return "[" + ",".join(map(repr, np.asarray(vector, dtype=np.float32).tolist())) + "]"


class PgVectorEntries:
    """Finds cache entries by key and by vector in PostgreSQL; keeps nothing per entry.

    ``exact_rows``: partitions up to this many rows are scanned exactly (the HNSW index
    cannot filter them, see the module docstring). ``ef_search``: the HNSW candidate
    list for a partition that is most of the table. ``m`` / ``ef_construction``: the
    HNSW index built per vector table.
    """

    #: Stores between two checks of the size bound.
    TRIM_EVERY = 64

    def __init__(self, rows: CacheRows, *, exact_rows: int = 2_000, ef_search: int = 100,
                 m: int = 16, ef_construction: int = 64, count_ttl: float = 10.0) -> None:
        self.rows = rows
        self.exact_rows = exact_rows
        self.ef_search = ef_search
        self._m, self._ef_construction = m, ef_construction
        self._count_ttl = count_ttl
        self._tables: set[int] = set()
        self._counts: dict[tuple[int, int], tuple[int, float]] = {}  # (dim, part) -> n, t
        self._totals: dict[int, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._since_trim = 0
        #: Set once entries stored without pgvector have their vector rows (see backfill).
        self.backfill_done = threading.Event()

    # -- schema -------------------------------------------------------------------------
    @staticmethod
    def table(dim: int) -> str:
        return f"budgetkit_cache_vector_{int(dim)}"

    def ensure(self, dim: int) -> str:
        """Create the vector table for ``dim`` (and its indexes) if it is not there."""
        name = self.table(dim)
        if dim in self._tables:
            return name
        with self.rows.store.engine.begin() as conn:
            conn.execute(text(f"SELECT pg_advisory_xact_lock({_DDL_LOCK})"))
            conn.execute(text(
                f"CREATE TABLE IF NOT EXISTS {name} ("
                f"seq BIGINT PRIMARY KEY REFERENCES budgetkit_cache_entry(seq) "
                f"ON DELETE CASCADE, partition_id INTEGER NOT NULL, "
                f"embedding vector({int(dim)}) NOT NULL)"))
            conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name}_partition "
                              f"ON {name} (partition_id)"))
            conn.execute(text(
                f"CREATE INDEX IF NOT EXISTS {name}_hnsw ON {name} USING hnsw "
                f"(embedding vector_cosine_ops) WITH (m = {int(self._m)}, "
                f"ef_construction = {int(self._ef_construction)})"))
        with self._lock:
            self._tables.add(dim)
        return name

    def _exists(self, dim: int) -> bool:
        if dim in self._tables:
            return True
        with self.rows.store.engine.connect() as conn:
            found = conn.execute(text("SELECT to_regclass(:name)"),
                                 {"name": self.table(dim)}).scalar()
        if found is not None:
            with self._lock:
                self._tables.add(dim)
        return found is not None

    # -- writing ------------------------------------------------------------------------
    def writer(self, vector: np.ndarray) -> Callable[[Any, int, int], None]:
        """What :meth:`CacheRows.upsert` runs in its transaction to store ``vector`` with
        its entry, so no process ever sees the entry without it."""
        name = self.ensure(len(vector))
        literal = _literal(vector)

        def write(conn: Any, seq: int, partition_id: int) -> None:
            conn.execute(text(f"INSERT INTO {name} (seq, partition_id, embedding) "
                              f"VALUES (:seq, :part, CAST(:vector AS vector))"),
                         {"seq": seq, "part": partition_id, "vector": literal})

        return write

    def backfill_in_background(self) -> None:
        try:
            self.backfill()
        except DBAPIError as exc:  # the database went away: the next open tries again
            logger.warning("budgetkit cache: copying older vectors into pgvector stopped: %s",
                           str(exc.orig).strip())
        finally:
            self.backfill_done.set()

    def backfill(self, batch: int = 2_000) -> int:
        """Give a vector row to every entry stored without one (by the in-process backend,
        before pgvector was installed); returns how many. Run in a background thread at
        open: until it is done those entries are found by exact key only."""
        added = 0
        engine = self.rows.store.engine
        with engine.connect() as conn:
            sizes = [int(size) for (size,) in conn.execute(text(
                "SELECT DISTINCT octet_length(embedding) FROM budgetkit_cache_entry "
                "WHERE embedding IS NOT NULL"))]
        for size in sizes:
            if size % 4:
                continue  # not float32 vectors: nothing we wrote
            name = self.ensure(size // 4)
            while True:
                with engine.begin() as conn:
                    rows = conn.execute(text(
                        f"SELECT e.seq, e.partition_id, e.embedding FROM "
                        f"budgetkit_cache_entry e WHERE octet_length(e.embedding) = {size} "
                        f"AND NOT EXISTS (SELECT 1 FROM {name} v WHERE v.seq = e.seq) "
                        f"LIMIT {int(batch)}")).fetchall()
                    if not rows:
                        break
                    conn.execute(text(
                        f"INSERT INTO {name} (seq, partition_id, embedding) VALUES "
                        f"(:seq, :part, CAST(:vector AS vector)) ON CONFLICT DO NOTHING"),
                        [{"seq": seq, "part": part,
                          "vector": _literal(np.frombuffer(blob, dtype=np.float32))}
                         for seq, part, blob in rows])
                added += len(rows)
        if added:
            logger.info("budgetkit cache: %d entries stored before pgvector now have their "
                        "vectors in the database", added)
        return added

    def stored(self, maxsize: int) -> None:
        """Called after each store: every ``TRIM_EVERY`` stores, the least recently used
        entries beyond ``maxsize`` are deleted (the in-process LRU does this per entry;
        here no process holds the whole list)."""
        with self._lock:
            self._since_trim += 1
            due = self._since_trim >= self.TRIM_EVERY
            if due:
                self._since_trim = 0
        if due:
            self.trim(maxsize)

    # -- reading ------------------------------------------------------------------------
    def find_key(self, key: str) -> Entry | None:
        """The entry stored under ``key`` by any process, with its text and expiry."""
        with self.rows.store.engine.connect() as conn:
            row = conn.execute(text(
                "SELECT seq, key, partition_id, focus, expires_at FROM budgetkit_cache_entry "
                "WHERE key = :key"), {"key": key}).first()
        if row is None:
            return None
        return self._entry(seq=row[0], key=row[1], part=row[2], focus=row[3],
                           expires_at=row[4])

    def search(self, partitions: Sequence[Partition], query: np.ndarray, *, k: int,
               threshold: float) -> list[tuple[Entry, float]]:
        """Up to ``k`` entries of ``partitions`` with cosine >= ``threshold``, best first."""
        dim = len(query)
        ids = self._partition_ids(partitions)
        if not ids or not self._exists(dim):
            return []
        here = sum(self._count(dim, part) for part in ids)
        literal = _literal(query)
        if here <= self.exact_rows:
            found = self._query(dim, ids, literal, k, exact=True)
        else:
            share = here / max(self._total(dim), here)
            ef = min(1_000, max(self.ef_search, math.ceil(2 * k / share), k))
            found = self._query(dim, ids, literal, k, exact=False, ef=ef)
            if len(found) < k:  # the graph's candidates held too few of these partitions
                found = self._query(dim, ids, literal, k, exact=True)
        return [(entry, score) for entry, score in found if score >= threshold]

    def _query(self, dim: int, ids: Iterable[int], literal: str, k: int, *, exact: bool,
               ef: int = 0) -> list[tuple[Entry, float]]:
        name = self.table(dim)
        inlined = ", ".join(str(int(part)) for part in ids)
        # "+ 0": an expression the HNSW index cannot order by, so the partition btree is used
        order = "(v.embedding <=> CAST(:q AS vector)) + 0" if exact else \
            "v.embedding <=> CAST(:q AS vector)"
        sql = text(f"SELECT v.seq, e.key, v.partition_id, e.focus, e.expires_at, "
                   f"1 - (v.embedding <=> CAST(:q AS vector)) FROM {name} v "
                   f"JOIN budgetkit_cache_entry e ON e.seq = v.seq "
                   f"WHERE v.partition_id IN ({inlined}) ORDER BY {order} LIMIT {int(k)}")
        with self.rows.store.engine.begin() as conn:
            if not exact:
                conn.execute(text(f"SET LOCAL hnsw.ef_search = {int(ef)}"))
            rows = conn.execute(sql, {"q": literal}).fetchall()
        return [(self._entry(seq=row[0], key=row[1], part=row[2], focus=row[3],
                             expires_at=row[4]), float(row[5])) for row in rows]

    def _entry(self, *, seq: int, key: str, part: int, focus: str,
               expires_at: Any) -> Entry:
        entry = Entry.from_row(seq, key, self._partition(part), -1)
        entry.focus, entry.expires_at = focus, expires_at
        return entry

    def _partition(self, part: int) -> Partition:
        known = self.rows._partitions
        if part not in known:
            with self.rows.store.engine.connect() as conn:
                for row in conn.execute(text(
                        "SELECT id, namespace, model, params_hash, context_hash, embedder "
                        "FROM budgetkit_cache_partition WHERE id = :id"), {"id": part}):
                    known[row[0]] = (row[1], row[2], row[3], row[4], row[5] or "")
        return known[part]

    def _partition_ids(self, partitions: Sequence[Partition]) -> list[int]:
        """Ids of the partitions that exist (in any process); unknown ones are looked up
        every time, since another process may create them at any moment."""
        known = {partition: number for number, partition in self.rows._partitions.items()}
        ids = [known[partition] for partition in partitions if partition in known]
        missing = [partition for partition in partitions if partition not in known]
        if missing:
            with self.rows.store.engine.connect() as conn:
                for partition in missing:
                    found = conn.execute(text(
                        "SELECT id FROM budgetkit_cache_partition WHERE hash = :hash"),
                        {"hash": partition_hash(partition)}).scalar()
                    if found is not None:
                        self.rows._partitions[int(found)] = partition
                        ids.append(int(found))
        return ids

    def _count(self, dim: int, part: int) -> int:
        """Rows of one partition (only the plan depends on it, see :func:`_rows`)."""
        cached = self._counts.get((dim, part))
        if cached is not None and time.monotonic() - cached[1] < self._count_ttl:
            return cached[0]
        count = _rows(self.rows.store.engine, self.table(dim), f"partition_id = {int(part)}")
        self._counts[(dim, part)] = (count, time.monotonic())
        return count

    def _total(self, dim: int) -> int:
        """Rows of the vector table (see :func:`_rows`)."""
        cached = self._totals.get(dim)
        if cached is not None and time.monotonic() - cached[1] < self._count_ttl:
            return cached[0]
        total = _rows(self.rows.store.engine, self.table(dim), "TRUE")
        self._totals[dim] = (total, time.monotonic())
        return total

    # -- whole-cache operations ---------------------------------------------------------
    def count(self) -> int:
        with self.rows.store.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM budgetkit_cache_entry")
                                    ).scalar_one())

    def keys_matching(self, *, namespace: str | None, model: str | None,
                      pattern: str | None) -> list[str]:
        """Keys of the entries matching every filter given (``pattern``: a glob over the
        question, matched here because SQL LIKE is not fnmatch)."""
        where, params = [], {}
        if namespace is not None:
            where.append("namespace = :namespace")
            params["namespace"] = namespace
        if model is not None:
            where.append("model = :model")
            params["model"] = model
        sql = "SELECT key, focus FROM budgetkit_cache_entry"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.rows.store.engine.connect() as conn:
            rows = conn.execute(text(sql), params).fetchall()
        return [key for key, focus in rows
                if pattern is None or fnmatch.fnmatchcase(_question(focus or ""), pattern)]

    def trim(self, maxsize: int) -> int:
        """Delete the least recently used entries beyond ``maxsize``; returns how many."""
        with self.rows.store.engine.begin() as conn:
            excess = int(conn.execute(text("SELECT count(*) FROM budgetkit_cache_entry")
                                      ).scalar_one()) - maxsize
            if excess <= 0:
                return 0
            result = conn.execute(text(
                "DELETE FROM budgetkit_cache_entry WHERE seq IN (SELECT seq FROM "
                "budgetkit_cache_entry ORDER BY COALESCE(last_hit_at, created_at), seq "
                f"LIMIT {int(excess)})"))
            return int(result.rowcount or 0)


#: Row counts up to this are exact (a count that stops there: a few ms at most);
#: above it the planner's estimate is used, which is good once the table was analyzed
#: (autovacuum does it for tables that size) and may be far off before.
_COUNT_UP_TO = 50_000


def _rows(engine: Any, table: str, where: str) -> int:
    """Rows of ``table`` matching ``where``: exact up to ``_COUNT_UP_TO``, the planner's
    estimate above it. A full count of 100k rows took 20-40 ms on the first lookup."""
    with engine.connect() as conn:
        count = int(conn.execute(text(
            f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {where} "
            f"LIMIT {_COUNT_UP_TO + 1}) AS bounded")).scalar_one())
        if count > _COUNT_UP_TO:
            count = max(count, _estimate(conn, f"SELECT 1 FROM {table} WHERE {where}"))
    return count


def _estimate(conn: Any, sql: str) -> int:
    """The planner's row estimate for ``sql`` (from the table's statistics: no scan)."""
    plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}")).scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def _question(stored: str) -> str:
    from ._keys import CONTEXT_MARK

    return stored.partition(CONTEXT_MARK)[0]
