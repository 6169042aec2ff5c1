"""The usage rollup: the ledger pre-aggregated per hour and per day, so reports read
thousands of buckets instead of millions of rows.

Four tables (defined in :mod:`budgetkit.ledger._tables`), each keyed by a UTC time bucket and a
set of grouping dimensions, holding the sums of every measure a report shows:

- ``budgetkit_usage_hourly``: hour x model, provider, operation type, project, status, task type
- ``budgetkit_usage_daily``: the same per day (derived from the hourly buckets on rebuild)
- ``budgetkit_usage_daily_user``: day x user, status
- ``budgetkit_usage_daily_tag``: day x tag, status (a call once per distinct tag; untagged
  calls under NULL, as grouping by tag counts them)

How they stay exact:

- :func:`apply_batch` runs in the transaction that inserts a batch of usage rows
  (``Store.insert_usage``, on the background writer's thread): the batch is summed per
  bucket in Python, then one ``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x``
  per bucket. A failed batch rolls back with its rollup increments. Buckets are written in
  one global order (table, bucket, key), so concurrent writers on PostgreSQL cannot deadlock.
- Purge deletes the buckets older than the cutoff's bucket and rebuilds the one bucket per
  table the cutoff falls inside from the rows left (:func:`after_purge`).
- :func:`rebuild` recomputes everything (or a time range) from the ledger. A ledger that
  had rows before the rollup existed is not trusted (``budgetkit_rollup_state`` has no row)
  until it is rebuilt; reports read the raw ledger until then. Rows written around
  budgetkit (bulk SQL, an older budgetkit) need a rebuild too: ``budgetkit rollup --rebuild``.
- On PostgreSQL, purge and rebuild lock the rollup tables (SHARE ROW EXCLUSIVE) first, so
  a writer's increments wait until the recomputed buckets are committed, then add to them.
  On SQLite the transaction's write lock does the same - for the whole database: a full
  rebuild holds it for about 11 s per million rows, during which the writer keeps rows in
  memory and budget checks wait for it. Rebuild a busy SQLite ledger when it is quiet.

SQLite and PostgreSQL only (``ON CONFLICT``); on other databases reports read the ledger.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Insert, Table, and_, func, literal_column, select
from sqlalchemy.engine import Connection

from budgetkit.progress import ProgressCallback

from ._tables import (
    ROLLUP_DIMENSIONS,
    ROLLUP_MEASURES,
    ROLLUP_STATE,
    ROLLUP_TAG_DIMENSIONS,
    ROLLUP_USER_DIMENSIONS,
    USAGE_DAILY,
    USAGE_DAILY_TAG,
    USAGE_DAILY_USER,
    USAGE_HOURLY,
    UsageRow,
    UsageTagRow,
    table_of,
)

__all__ = ["Shape", "SHAPES", "ROLLUP_VERSION", "RollupStatus", "apply_batch",
           "batch_statements", "rebuild",
           "after_purge", "init_state", "is_ready", "plan_pieces", "supports", "status"]

ROLLUP_NAME = "usage"
#: Bumped when the tables' meaning changes: an older rollup is then rebuilt, not trusted.
ROLLUP_VERSION = 2  # 2: the per-tag table
GRAINS = ("day", "hour")  # coarsest first
#: Rows summed between GIL releases on the writer thread (~0.2-0.4 ms of Python each).
_YIELD_ROWS = 100
_GRAIN_STEP = {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1)}
USAGE = table_of(UsageRow)
TAGS = table_of(UsageTagRow)


@dataclass(frozen=True)
class Shape:
    """One rollup table: its time grain, its dimensions, and where a rebuild reads from."""

    name: str
    table: Table
    grain: str
    dimensions: tuple[str, ...]
    derived_from: str | None = None  # a finer shape with the same dimensions


# Maintenance order matters: a derived shape is rebuilt after the shape it sums.
SHAPES = (
    Shape("hourly", USAGE_HOURLY, "hour", ROLLUP_DIMENSIONS),
    Shape("daily", USAGE_DAILY, "day", ROLLUP_DIMENSIONS, derived_from="hourly"),
    Shape("daily_user", USAGE_DAILY_USER, "day", ROLLUP_USER_DIMENSIONS),
    Shape("daily_tag", USAGE_DAILY_TAG, "day", ROLLUP_TAG_DIMENSIONS),
)
_BY_NAME = {shape.name: shape for shape in SHAPES}
_INT_MEASURES = tuple(m for m in ROLLUP_MEASURES if m != "latency_sum")


def supports(dialect: str) -> bool:
    return dialect in ("sqlite", "postgresql")


def truncate(value: dt.datetime, grain: str) -> dt.datetime:
    """The start of the hour / day holding ``value``."""
    value = value.replace(minute=0, second=0, microsecond=0)
    return value.replace(hour=0) if grain == "day" else value


def _ceil(value: dt.datetime, grain: str) -> dt.datetime:
    start = truncate(value, grain)
    return start if start == value else start + _GRAIN_STEP[grain]


@functools.lru_cache(maxsize=65536)
def dims_key(values: tuple[Any, ...]) -> str:
    """A digest of one bucket's dimension values (NULL and '' stay distinct)."""
    # as text, the way the columns store them: a rebuild reads back what a batch wrote
    text = json.dumps([None if value is None else str(value) for value in values])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# -- maintenance on insert -------------------------------------------------------------
def _bound_time(value: dt.datetime, sqlite: bool) -> Any:
    # SQLite compares datetimes as text: store the exact text SQLAlchemy binds
    return value.isoformat(sep=" ", timespec="microseconds") if sqlite else value


@functools.lru_cache(maxsize=32)
def _upsert_sql(shape_name: str, paramstyle: str, add: bool = True) -> str:
    """Add to a bucket, creating it if needed; ``add=False``: a plain insert."""
    shape = _BY_NAME[shape_name]
    name = shape.table.name
    mark = "?" if paramstyle == "qmark" else "%s"
    columns = ["bucket", "dims_key", *shape.dimensions, *ROLLUP_MEASURES]
    insert = (f"INSERT INTO {name} ({', '.join(columns)}) "
              f"VALUES ({', '.join(mark for _ in columns)})")
    if not add:
        return insert
    updates = ", ".join(f"{m} = {name}.{m} + excluded.{m}" for m in ROLLUP_MEASURES)
    return f"{insert} ON CONFLICT (bucket, dims_key) DO UPDATE SET {updates}"


def batch_buckets(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[tuple[Any, ...], list[Any]]]:
    """The batch summed per shape and bucket: ``{shape: {(bucket, *dims): measures}}``."""
    # Runs on the writer thread, holding the GIL the application wants: rows are only
    # sorted into buckets here, and each bucket summed column-wise by C builtins below.
    grouped: dict[str, dict[tuple[Any, ...], list[tuple[Any, ...]]]] = {
        shape.name: {} for shape in SHAPES}
    wide_dims = ROLLUP_DIMENSIONS
    hourly, daily = grouped["hourly"], grouped["daily"]
    daily_user, daily_tag = grouped["daily_user"], grouped["daily_tag"]
    # dict.get bound once is this hot loop's fastest lookup. The rows are the dicts the
    # writer is handed (typed as Mappings upstream, see Store.insert_usage).
    get = cast("Callable[[Mapping[str, Any], str], Any]", dict.get)
    for index, row in enumerate(rows):
        if index and not index % _YIELD_ROWS:
            time.sleep(0)  # let the application's threads have the GIL now and then
        created = row["created_at"]
        if created.tzinfo is not None:
            created = created.astimezone(dt.timezone.utc).replace(tzinfo=None)
        hour = created.replace(minute=0, second=0, microsecond=0)
        day = hour.replace(hour=0)
        latency = get(row, "latency_ms")
        measures = (1, get(row, "input_tokens") or 0, get(row, "output_tokens") or 0,
                    get(row, "cached_input_tokens") or 0, get(row, "cache_write_tokens") or 0,
                    get(row, "reasoning_tokens") or 0, get(row, "total_tokens") or 0,
                    get(row, "cost_nanos") or 0, get(row, "saved_nanos") or 0,
                    0 if latency is None else 1, 0.0 if latency is None else float(latency))
        wide = tuple([get(row, d) for d in wide_dims])
        status = get(row, "status")
        hourly.setdefault((hour, *wide), []).append(measures)
        daily.setdefault((day, *wide), []).append(measures)
        daily_user.setdefault((day, get(row, "user_id"), status), []).append(measures)
        # distinct tags, as Store.insert_usage writes them to budgetkit_usage_tag
        for tag in (dict.fromkeys(get(row, "tags") or ()) or (None,)):
            daily_tag.setdefault((day, tag, status), []).append(measures)
    return {name: {key: (list(items[0]) if len(items) == 1
                         else [sum(column) for column in zip(*items)])
                   for key, items in buckets.items()}
            for name, buckets in grouped.items()}


def batch_statements(rows: Sequence[Mapping[str, Any]], dialect: str, paramstyle: str
                     ) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The upserts that add a batch of usage rows to every rollup table, worked out before
    the transaction (so the database's write lock is not held while Python sums)."""
    sqlite = dialect == "sqlite"
    summed = batch_buckets(rows)
    statements = []
    for shape in SHAPES:
        params = sorted(
            ((_bound_time(key[0], sqlite), dims_key(key[1:]), *key[1:], *measures)
             for key, measures in summed[shape.name].items()),
            key=lambda p: (p[0], p[1]))
        if params:
            statements.append((_upsert_sql(shape.name, paramstyle), params))
    return statements


def apply_batch(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Add a batch of usage rows to every rollup table (inside the caller's transaction)."""
    for sql, params in batch_statements(rows, conn.dialect.name, conn.dialect.paramstyle):
        conn.exec_driver_sql(sql, params)


# -- rebuilding ----------------------------------------------------------------------------
def _bucket_expr(dialect: str, grain: str, column: Any) -> Any:
    if dialect == "sqlite":  # the exact text SQLAlchemy binds a datetime as
        pattern = "%Y-%m-%d %H:00:00.000000" if grain == "hour" else "%Y-%m-%d 00:00:00.000000"
        return func.strftime(pattern, column)
    return func.date_trunc(grain, column)


def _in_range(column: Any, start: dt.datetime | None, end: dt.datetime | None) -> Any:
    conditions = []
    if start is not None:
        conditions.append(column >= start)
    if end is not None:
        conditions.append(column < end)
    return and_(*conditions) if conditions else literal_column("1") == 1


def _refresh(conn: Connection, shape: Shape, start: dt.datetime | None,
             end: dt.datetime | None) -> None:
    """Recompute ``shape``'s buckets in ``[start, end)`` (bucket-aligned; None: unbounded)."""
    table, dialect = shape.table, conn.dialect.name
    conn.execute(table.delete().where(_in_range(table.c.bucket, start, end)))
    dims = shape.dimensions
    if shape.derived_from is not None:  # sum the finer buckets in the database
        finer = _BY_NAME[shape.derived_from].table
        bucket = _bucket_expr(dialect, shape.grain, finer.c.bucket)
        query = (select(bucket, finer.c.dims_key, *[finer.c[d] for d in dims],
                        *[func.sum(finer.c[m]) for m in ROLLUP_MEASURES])
                 .where(_in_range(finer.c.bucket, start, end))
                 .group_by(bucket, finer.c.dims_key, *[finer.c[d] for d in dims]))
        conn.execute(table.insert().from_select(
            ["bucket", "dims_key", *dims, *ROLLUP_MEASURES], query))
        return
    c = USAGE.c
    bucket = _bucket_expr(dialect, shape.grain, c.created_at)
    columns = [TAGS.c.tag if d == "tag" else c[d] for d in dims]
    query = (select(bucket, *columns, func.count(),
                    *[func.coalesce(func.sum(c[m]), 0) for m in _INT_MEASURES[1:-1]],
                    func.count(c.latency_ms), func.coalesce(func.sum(c.latency_ms), 0.0))
             .where(_in_range(c.created_at, start, end))
             .group_by(bucket, *columns))
    if "tag" in dims:  # once per tag; untagged rows once, under NULL
        query = query.select_from(USAGE.outerjoin(TAGS, TAGS.c.usage_id == c.id))
    # digests are computed here, so the grouped rows pass through Python, in chunks; plain
    # inserts: the range was just emptied, and writers wait (SQLite's write lock, _lock)
    sql = _upsert_sql(shape.name, conn.dialect.paramstyle, add=False)
    width = len(dims)
    # (the option on the statement: on the connection it would stick, and PostgreSQL's
    # server-side cursors cannot run the executemany below)
    result = conn.execute(query.execution_options(yield_per=10_000))
    for chunk in result.partitions():
        params = [(row[0], dims_key(tuple(row[1:1 + width])), *row[1:]) for row in chunk]
        conn.exec_driver_sql(sql, params)


def _lock(conn: Connection) -> None:
    """PostgreSQL: make writers' increments wait until recomputed buckets are committed."""
    if conn.dialect.name == "postgresql":
        names = ", ".join(shape.table.name for shape in SHAPES)
        conn.exec_driver_sql(f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE")


def _mark_ready(conn: Connection) -> None:
    conn.execute(ROLLUP_STATE.delete().where(ROLLUP_STATE.c.name == ROLLUP_NAME))
    conn.execute(ROLLUP_STATE.insert().values(name=ROLLUP_NAME, version=ROLLUP_VERSION,
                                              built_at=_utcnow()))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class RollupStatus:
    """Whether reports can trust the rollup, and how large it is."""

    ready: bool
    version: int | None
    built_at: dt.datetime | None
    buckets: Mapping[str, int]
    seconds: float | None = None  # how long the rebuild took, when this is its result

    def to_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "version": self.version,
                "built_at": None if self.built_at is None else self.built_at.isoformat(),
                "buckets": dict(self.buckets), "seconds": self.seconds}


def rebuild(sa_engine: Any, progress: ProgressCallback | None = None) -> RollupStatus:
    """Recompute every rollup table from the ledger in one transaction; mark it trusted.

    ``progress(done, total)`` is called after each rollup table (see :mod:`budgetkit.progress`).
    """
    started = time.perf_counter()
    with sa_engine.begin() as conn:
        if not supports(conn.dialect.name):
            return status(sa_engine)
        _lock(conn)
        if progress is not None:
            progress(0, len(SHAPES))
        for built, shape in enumerate(SHAPES, 1):
            _refresh(conn, shape, None, None)
            if progress is not None:
                progress(built, len(SHAPES))
        _mark_ready(conn)
    done = status(sa_engine)
    return RollupStatus(done.ready, done.version, done.built_at, done.buckets,
                        seconds=time.perf_counter() - started)


def begin_purge(conn: Connection) -> None:
    """Take the locks a purge needs before it deletes ledger rows (PostgreSQL)."""
    if supports(conn.dialect.name):
        _lock(conn)


def after_purge(conn: Connection, cutoff: dt.datetime) -> None:
    """Ledger rows before ``cutoff`` were just deleted (same transaction): drop the buckets
    wholly before it and recompute the one bucket per table that the cutoff cuts."""
    if not supports(conn.dialect.name):
        return
    for shape in SHAPES:  # hourly first: the daily buckets are re-derived from it
        table = shape.table
        start = truncate(cutoff, shape.grain)
        conn.execute(table.delete().where(table.c.bucket < start))
        if start < cutoff:
            _refresh(conn, shape, start, start + _GRAIN_STEP[shape.grain])


def init_state(sa_engine: Any) -> None:
    """On table creation: an empty ledger starts with a trusted (empty) rollup."""
    with sa_engine.begin() as conn:
        if not supports(conn.dialect.name):
            return
        if conn.execute(select(ROLLUP_STATE.c.name)
                        .where(ROLLUP_STATE.c.name == ROLLUP_NAME)).first() is not None:
            return
        if conn.execute(select(USAGE.c.id).limit(1)).first() is not None:
            return  # rows from before the rollup: untrusted until rebuilt
        values = {"name": ROLLUP_NAME, "version": ROLLUP_VERSION, "built_at": _utcnow()}
        statement: Insert
        if conn.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert
            statement = sqlite_insert(ROLLUP_STATE).values(values).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects.postgresql import insert as postgresql_insert
            statement = postgresql_insert(ROLLUP_STATE).values(values).on_conflict_do_nothing()
        conn.execute(statement)


def is_ready(conn: Connection) -> bool:
    if not supports(conn.dialect.name):
        return False
    version = conn.execute(select(ROLLUP_STATE.c.version)
                           .where(ROLLUP_STATE.c.name == ROLLUP_NAME)).scalar()
    return version == ROLLUP_VERSION


def status(sa_engine: Any) -> RollupStatus:
    with sa_engine.connect() as conn:
        if not supports(conn.dialect.name):
            return RollupStatus(False, None, None, {})
        row = conn.execute(select(ROLLUP_STATE.c.version, ROLLUP_STATE.c.built_at)
                           .where(ROLLUP_STATE.c.name == ROLLUP_NAME)).first()
        buckets = {shape.table.name: int(conn.execute(
            select(func.count()).select_from(shape.table)).scalar() or 0) for shape in SHAPES}
    version, built_at = (row[0], row[1]) if row is not None else (None, None)
    return RollupStatus(version == ROLLUP_VERSION, version, built_at, buckets)


# -- query plans -----------------------------------------------------------------------------
def shape_for(grain: str, dimensions: Iterable[str]) -> Shape | None:
    """The first shape of ``grain`` holding every one of ``dimensions``."""
    wanted = set(dimensions)
    for shape in SHAPES:
        if shape.grain == grain and wanted <= set(shape.dimensions):
            return shape
    return None


Piece = tuple[str, dt.datetime, dt.datetime, bool]  # (raw|day|hour, start, end, end inclusive)


def plan_pieces(start: dt.datetime, end: dt.datetime, end_inclusive: bool,
                grains: Sequence[str]) -> list[Piece]:
    """Split ``[start, end)`` into whole buckets of the coarsest grain possible, finer
    grains toward the edges, and raw-ledger slices for what no bucket covers exactly."""

    def split(lo: dt.datetime, hi: dt.datetime, levels: Sequence[str]) -> list[Piece]:
        if lo >= hi:
            return []
        if not levels:
            return [("raw", lo, hi, False)]
        grain = levels[0]
        whole_lo, whole_hi = _ceil(lo, grain), truncate(hi, grain)
        if whole_lo >= whole_hi:
            return split(lo, hi, levels[1:])
        return [*split(lo, whole_lo, levels[1:]), (grain, whole_lo, whole_hi, False),
                *split(whole_hi, hi, levels[1:])]

    pieces = split(start, end, [g for g in GRAINS if g in grains])
    if end_inclusive:  # rows stamped exactly at the end belong to the period too
        if pieces and pieces[-1][0] == "raw" and pieces[-1][2] == end:
            pieces[-1] = ("raw", pieces[-1][1], end, True)
        else:
            pieces.append(("raw", end, end, True))
    return pieces
