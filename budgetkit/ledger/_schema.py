"""Versioned schema migrations: a database knows its schema version, and an engine brings
an older one up to date in numbered steps.

``budgetkit_schema_version`` holds one row: the version of the database's schema. A new
database gets every table and the latest version. A database made by an earlier release
is upgraded by the steps in :data:`MIGRATIONS` after its version, in order, each in one
transaction with its version bump (PostgreSQL and SQLite both roll DDL back), under a
lock (PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``), so processes starting
together upgrade once. A database newer than this budgetkit knows is refused with a
:class:`ConfigurationError` before anything is touched.

Version 1 is the schema of budgetkit 0.1.0, which had no version table: a database with
budgetkit's tables and no version row is version 1. ``tests/test_schema.py`` upgrades a
database made with 0.1.0's exact DDL (``tests/data/schema-0.1.0-*.sql``) on SQLite and
PostgreSQL and checks the result equals a new database, table by table, column by column
and index by index: a change to a table without a migration step fails that test.

Adding a step: write a function of the connection and the metadata (``create_tables``,
``add_column`` and ``create_index`` below do the usual changes), append
``Migration(version, release, description, function)`` to :data:`MIGRATIONS`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import MetaData, inspect, text

from budgetkit.errors import ConfigurationError

__all__ = ["migrate", "schema_version", "Migration", "MIGRATIONS", "SCHEMA_VERSION",
           "VERSION_TABLE", "create_tables", "add_column", "create_index"]

logger = logging.getLogger("budgetkit")

VERSION_TABLE = "budgetkit_schema_version"
_PREFIX = "budgetkit_"
_LOCK_KEY = 0x6B62_7363  # PostgreSQL advisory lock of schema migrations ("bksc")


@dataclass(frozen=True)
class Migration:
    """One step: brings a database from ``version - 1`` to ``version``."""

    version: int
    release: str  # the budgetkit release whose schema this step produces
    description: str
    apply: Callable[[Any, MetaData], None]


# -- operations a step is made of ---------------------------------------------------------
def create_tables(*names: str) -> Callable[[Any, MetaData], None]:
    """A step that creates these tables (as the metadata defines them, with their indexes)."""
    def step(conn: Any, metadata: MetaData) -> None:
        metadata.create_all(conn, tables=[metadata.tables[name] for name in names],
                            checkfirst=True)
    return step


def add_column(conn: Any, metadata: MetaData, table: str, column: str) -> None:
    """``ALTER TABLE ... ADD COLUMN`` as the metadata defines it. A NOT NULL column without
    a default cannot be filled for existing rows: a clear error, and the step rolls back."""
    definition = metadata.tables[table].columns[column]
    conn.execute(text(_add_column_sql(conn, table, definition)))


def create_index(conn: Any, metadata: MetaData, table: str, name: str) -> None:
    (index,) = [index for index in metadata.tables[table].indexes if index.name == name]
    index.create(conn, checkfirst=True)


#: Every step since 0.1.0 (version 1), in order.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "0.2.0", "budget definitions stored in the ledger; learned router scorers",
              create_tables("budgetkit_budget_definition", "budgetkit_budget_registry",
                            "budgetkit_router_scorer")),
)
SCHEMA_VERSION = MIGRATIONS[-1].version if MIGRATIONS else 1


# -- running them ---------------------------------------------------------------------------
def schema_version(engine: Any) -> int | None:
    """The database's schema version; None for a database without budgetkit's tables."""
    with engine.connect() as conn:
        return _version(conn)


def migrate(engine: Any, metadata: MetaData,
            migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Bring the database up to date (a new one: every table); returns the versions of the
    steps applied (empty when it was current or new). Idempotent and safe to run from many
    processes at once."""
    latest = migrations[-1].version if migrations else 1
    with engine.connect() as conn:
        version = _version(conn)
    if version is not None and version > latest:
        raise _too_new(version, latest)
    if version == latest:
        metadata.create_all(engine, checkfirst=True)  # (a table some plugin module defines)
        return []
    for attempt in (1, 2):
        try:
            return _migrate_locked(engine, metadata, migrations, latest)
        except ConfigurationError:
            raise
        except Exception:  # SQLite: another process created a table between our looks
            if attempt == 2 or engine.dialect.name != "sqlite":
                raise
            time.sleep(0.05)
    return []  # (not reached)


def _migrate_locked(engine: Any, metadata: MetaData, migrations: Sequence[Migration],
                    latest: int) -> list[int]:
    applied: list[int] = []
    with engine.connect() as conn:
        _lock(conn)
        version = _version(conn)  # again, under the lock: another process may have done it
        if version is not None and version > latest:
            conn.rollback()
            raise _too_new(version, latest)
        if version is None:  # a new database: every table, at the latest version
            metadata.create_all(conn, checkfirst=True)
            _set_version(conn, latest, fresh=True)
            conn.commit()
            return applied
        if version == latest:
            conn.commit()
            return applied
        _ensure_version_table(conn)
        for step in migrations:
            if step.version <= version:
                continue
            try:
                step.apply(conn, metadata)
                _set_version(conn, step.version)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            applied.append(step.version)
            logger.warning("budgetkit: database schema upgraded to version %d (%s): %s",
                           step.version, step.release, step.description)
            if step is not migrations[-1]:
                _lock(conn)  # the next step's transaction
    return applied


def _lock(conn: Any) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock: DDL inside rolls back too


def _version(conn: Any) -> int | None:
    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE in tables:
        value = conn.execute(text(f"SELECT version FROM {VERSION_TABLE} WHERE id = 1")).scalar()
        if value is not None:
            return int(value)
    if any(name.startswith(_PREFIX) and name != VERSION_TABLE for name in tables):
        return 1  # budgetkit 0.1.0 had no version table
    return None


def _ensure_version_table(conn: Any) -> None:
    conn.execute(text(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (id INTEGER PRIMARY KEY, "
                      "version INTEGER NOT NULL, updated_at TIMESTAMP NOT NULL)"))


def _set_version(conn: Any, version: int, *, fresh: bool = False) -> None:
    if fresh:
        _ensure_version_table(conn)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    updated = conn.execute(text(f"UPDATE {VERSION_TABLE} SET version = :v, updated_at = :t "
                                "WHERE id = 1"), {"v": version, "t": now}).rowcount
    if not updated:
        conn.execute(text(f"INSERT INTO {VERSION_TABLE} (id, version, updated_at) "
                          "VALUES (1, :v, :t)"), {"v": version, "t": now})


def _too_new(version: int, latest: int) -> ConfigurationError:
    return ConfigurationError(
        f"the database's schema is version {version}, made by a newer budgetkit; this one "
        f"knows versions up to {latest}: upgrade budgetkit (nothing was changed)")


def _add_column_sql(conn: Any, table: str, column: Any) -> str:
    dialect = conn.dialect
    quote = dialect.identifier_preparer.quote
    sql = (f"ALTER TABLE {quote(table)} ADD COLUMN {quote(column.name)} "
           f"{column.type.compile(dialect=dialect)}")
    default = None
    if column.server_default is not None:
        default = str(column.server_default.arg)
    elif column.default is not None and getattr(column.default, "is_scalar", False):
        default = _literal(column.default.arg)
    if default is not None:
        sql += f" DEFAULT {default}"
    if not column.nullable:
        if default is None:
            raise ConfigurationError(
                f"cannot add column {column.name!r} to table {table!r}: it is NOT NULL "
                "without a default, so existing rows cannot be filled (the migration step "
                "needs a default or a backfill)")
        sql += " NOT NULL"
    return sql


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise ConfigurationError(f"cannot write a default of {value!r} into a column definition")
