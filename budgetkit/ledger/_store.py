"""The store: budgetkit's one seam to the database (SQLModel over SQLAlchemy).

SQLite (a file, WAL mode) by default; any SQLAlchemy URL works, PostgreSQL is tested.
Components that persist something (ledger, budgets, cache) register their table modules in
``TABLE_MODULES`` so one ``create_all`` makes every table.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, select
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.pool import StaticPool
from sqlmodel import SQLModel, col

from budgetkit.errors import ConfigurationError
from budgetkit.progress import ProgressCallback

from . import rollups as _rollup

from ._schema import migrate
from ._tables import UsageRow, UsageTagRow, table_of

__all__ = ["Store", "default_db_url", "TABLE_MODULES", "usage_columns"]

logger = logging.getLogger("budgetkit")

# Modules whose import defines SQLModel tables. Add yours here.
TABLE_MODULES: list[str] = ["budgetkit.ledger._tables", "budgetkit.budgets._tables",
                             "budgetkit.cache._tables", "budgetkit.routing._tables"]


def default_db_url() -> str:
    """``BUDGETKIT_DB`` (a URL or a file path) or ``~/.budgetkit/budgetkit.db``."""
    configured = os.environ.get("BUDGETKIT_DB")
    if configured:
        return configured if "://" in configured else _sqlite_url(Path(configured))
    return _sqlite_url(Path.home() / ".budgetkit" / "budgetkit.db")


def _sqlite_url(path: Path) -> str:
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _normalise_url(db: str | os.PathLike[str] | None) -> str:
    if db is None:
        return default_db_url()
    text = os.fspath(db)
    if not text:
        raise ConfigurationError("db must be a SQLAlchemy URL or a file path, got ''")
    if "://" in text:
        if text.startswith("postgresql://"):  # psycopg 3 is the driver we install
            text = "postgresql+psycopg://" + text[len("postgresql://"):]
        return text
    if text == ":memory:":
        return "sqlite://"
    return _sqlite_url(Path(text))


class Store:
    """Database access for every budgetkit component."""

    def __init__(self, db: str | os.PathLike[str] | None = None, *, echo: bool = False) -> None:
        self.url = _normalise_url(db)
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.url in ("sqlite://", "sqlite:///:memory:"):
            # One in-memory database shared by the writer thread and the caller.
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        elif self.is_sqlite:
            kwargs.update(connect_args={"check_same_thread": False, "timeout": 30})
        else:
            kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=5)
        self.engine: SAEngine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._tables_ready = False
        self._insert_sql: tuple[str, str] | None = None
        self._maintain_rollup = _rollup.supports(self.engine.dialect.name)

    def create_tables(self) -> None:
        """Create every registered table, or upgrade an older database's schema through its
        versioned migrations (see ``_schema``); idempotent."""
        for module in TABLE_MODULES:
            importlib.import_module(module)
        # a new database gets every table; an older one is upgraded step by step
        migrate(self.engine, SQLModel.metadata)
        _rollup.init_state(self.engine)
        self._tables_ready = True

    def ensure_tables(self) -> None:
        if not self._tables_ready:
            self.create_tables()

    def dispose(self) -> None:
        self.engine.dispose()

    # -- usage ledger ----------------------------------------------------------------
    def insert_usage(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert usage rows (dicts of :class:`UsageRow` columns) in one transaction.

        This is the ledger's hot loop, so it goes straight to the driver's ``executemany``
        with a statement built once: SQLAlchemy's per-row parameter processing cost ~40 µs
        of Python per row, time the writer thread took from the application's threads.
        The same transaction adds the batch to the rollup tables (:mod:`budgetkit.ledger.rollups`),
        so the rollup never holds a row the ledger lacks, nor the reverse.
        """
        if not rows:
            return
        self.ensure_tables()
        usage_sql, tag_sql = self._insert_statements()
        sqlite = self.is_sqlite
        rows = [_fitted(row) for row in rows]  # the same row unless a value is too long
        # Everything Python computes is ready before the transaction opens (SQLite holds its
        # one write lock until commit, and budget checks may be waiting for it), and the
        # loops let go of the GIL now and then: this runs on the writer thread, beside the
        # application's threads.
        usage_params: list[tuple[Any, ...]] = []
        for start in range(0, len(rows), _YIELD_ROWS):
            if start:
                time.sleep(0)
            usage_params.extend(_usage_params(row, sqlite)
                                for row in rows[start:start + _YIELD_ROWS])
        tag_params = [(row["id"], tag)
                      for row in rows for tag in dict.fromkeys(row.get("tags") or ())]
        rollup = (_rollup.batch_statements(rows, self.engine.dialect.name,
                                           self.engine.dialect.paramstyle)
                  if self._maintain_rollup else ())
        with self.engine.begin() as conn:
            conn.exec_driver_sql(usage_sql, usage_params)
            if tag_params:
                conn.exec_driver_sql(tag_sql, tag_params)
            for sql, params in rollup:
                conn.exec_driver_sql(sql, params)

    def insert_missing_usage(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Insert the rows whose ids the ledger lacks (replaying a journal); returns how
        many. Idempotent: a row already there is skipped, not inserted twice, so the rollup
        counts each row once (a plain insert-ignore could not tell the rollup which rows
        it skipped)."""
        if not rows:
            return 0
        self.ensure_tables()
        usage_table = table_of(UsageRow)
        ids = list({row["id"] for row in rows})
        with self.engine.connect() as conn:
            present = set(conn.execute(select(usage_table.c.id)
                                       .where(usage_table.c.id.in_(ids))).scalars())
        missing: dict[str, Mapping[str, Any]] = {}
        for row in rows:
            if row["id"] not in present:
                missing.setdefault(row["id"], row)
        self.insert_usage(list(missing.values()))
        return len(missing)

    def _insert_statements(self) -> tuple[str, str]:
        if self._insert_sql is None:
            mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
            quote = self.engine.dialect.identifier_preparer.quote
            names = ", ".join(quote(name) for name in usage_columns())
            marks = ", ".join(mark for _ in usage_columns())
            self._insert_sql = (
                f"INSERT INTO {UsageRow.__tablename__} ({names}) VALUES ({marks})",
                f"INSERT INTO {UsageTagRow.__tablename__} (usage_id, tag) VALUES ({mark}, {mark})",
            )
        return self._insert_sql

    def query_usage(self, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
                    model: str | None = None, user_id: str | None = None,
                    operation_type: str | None = None, run_id: str | None = None,
                    root_run_id: str | None = None, request_id: str | None = None,
                    status: str | None = None, project: str | None = None,
                    session_id: str | None = None, tag: str | None = None,
                    limit: int | None = None) -> list[UsageRow]:
        self.ensure_tables()
        query = select(UsageRow)
        filters = {"model": model, "user_id": user_id, "operation_type": operation_type,
                   "run_id": run_id, "root_run_id": root_run_id, "request_id": request_id,
                   "status": status, "project": project, "session_id": session_id}
        for column, value in filters.items():
            if value is not None:
                query = query.where(getattr(UsageRow, column) == value)
        if since is not None:
            query = query.where(col(UsageRow.created_at) >= _utc_naive(since))
        if until is not None:
            query = query.where(col(UsageRow.created_at) < _utc_naive(until))
        if tag is not None:
            tagged = select(col(UsageTagRow.usage_id)).where(col(UsageTagRow.tag) == tag)
            query = query.where(col(UsageRow.id).in_(tagged))
        query = query.order_by(col(UsageRow.created_at), col(UsageRow.id))
        if limit is not None:
            query = query.limit(limit)
        from sqlmodel import Session

        with Session(self.engine) as session:
            return list(session.scalars(query).all())

    def purge_usage(self, before: dt.datetime) -> int:
        """Delete usage rows created before ``before``; returns how many.

        The rollup follows in the same transaction: buckets wholly before ``before`` are
        dropped, and the hour and day ``before`` falls inside are recomputed from the rows
        left, so a cutoff in the middle of an hour stays exact.
        """
        self.ensure_tables()
        cutoff = _utc_naive(before)
        usage_table = table_of(UsageRow)
        tag_table = table_of(UsageTagRow)
        old_ids = select(usage_table.c.id).where(usage_table.c.created_at < cutoff)
        with self.engine.begin() as conn:
            _rollup.begin_purge(conn)
            conn.execute(delete(tag_table).where(tag_table.c.usage_id.in_(old_ids)))
            result = conn.execute(delete(usage_table).where(usage_table.c.created_at < cutoff))
            _rollup.after_purge(conn, cutoff)
        return int(result.rowcount or 0)

    # -- rollup ----------------------------------------------------------------------------
    def rebuild_rollup(self, progress: ProgressCallback | None = None) -> _rollup.RollupStatus:
        """Recompute the rollup tables from the ledger (after rows were written around
        budgetkit, or for a ledger older than the rollup); reports then use them.
        ``progress(done, total)`` is called after each rollup table."""
        self.ensure_tables()
        return _rollup.rebuild(self.engine, progress)

    def rollup_status(self) -> _rollup.RollupStatus:
        self.ensure_tables()
        return _rollup.status(self.engine)


#: Rows prepared between GIL releases on the writer thread (~0.3 ms of Python each).
_YIELD_ROWS = 100
_USAGE_COLUMNS: tuple[str, ...] = ()
_JSON_COLUMNS = frozenset({"tags", "metadata"})


def usage_columns() -> tuple[str, ...]:
    """The usage table's column names, in table order."""
    global _USAGE_COLUMNS
    if not _USAGE_COLUMNS:
        _USAGE_COLUMNS = tuple(c.name for c in table_of(UsageRow).columns)
    return _USAGE_COLUMNS


def _usage_params(row: Mapping[str, Any], sqlite: bool) -> tuple[Any, ...]:
    """One row as driver parameters, in column order (JSON and datetimes pre-encoded as
    SQLAlchemy would, so rows read back through the ORM are identical)."""
    # Runs on the writer thread for every row, holding the GIL the application's threads
    # want: one list comprehension, and no JSON encoder for the usual empty tags/metadata.
    columns = usage_columns()
    values: list[Any] = [row.get(name) for name in columns]
    tags_at, metadata_at, created_at = _SPECIAL_AT or _special_positions(columns)
    tags, metadata = values[tags_at], values[metadata_at]
    values[tags_at] = json.dumps(list(tags), default=str) if tags else "[]"
    values[metadata_at] = json.dumps(dict(metadata), default=str) if metadata else "{}"
    if sqlite:
        values[created_at] = values[created_at].isoformat(sep=" ", timespec="microseconds")
    return tuple(values)


_SPECIAL_AT: tuple[int, int, int] | None = None
_LIMITS: tuple[tuple[str, int], ...] | None = None
_clipped_columns: set[str] = set()


def _fitted(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """``row`` with every text value cut to its column's length (a copy, logged once per
    column, only when one is too long): PostgreSQL refuses a longer value, and with it the
    row; SQLite would keep it, so both keep the same cut value."""
    global _LIMITS
    limits = _LIMITS
    if limits is None:
        # (sqlmodel's AutoString is a TypeDecorator, not a String: read its length as such)
        limits = _LIMITS = tuple(
            (column.name, length)
            for column in table_of(UsageRow).columns
            if (length := getattr(column.type, "length", None)))
    copy = None
    for name, limit in limits:
        value = row.get(name)
        if value is not None and len(value) > limit:
            if copy is None:
                copy = dict(row)
            copy[name] = value[:limit]
            if name not in _clipped_columns:
                _clipped_columns.add(name)
                logger.warning("budgetkit: usage %s values longer than %d characters are cut "
                               "to fit the column (first: %.60r...)", name, limit, value)
    return row if copy is None else copy


def _special_positions(columns: tuple[str, ...]) -> tuple[int, int, int]:
    global _SPECIAL_AT
    _SPECIAL_AT = (columns.index("tags"), columns.index("metadata"),
                   columns.index("created_at"))
    return _SPECIAL_AT


def _utc_naive(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def iter_chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
