"""The budget book's SQL: the statements on the hot path and the driver that runs them.

Reserve and settle run as plain SQL on the driver's connection (SQLAlchemy's per-statement
work cost more than the statements themselves); everything else uses SQLAlchemy Core.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Insert, Table, func, or_, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.expression import bindparam

from budgetkit.ledger import table_of

from ._budget import Budget
from ._tables import (
    BudgetAlertRow,
    BudgetApprovalRow,
    BudgetReservationRow,
    BudgetWindowRow,
)

__all__ = ["W", "R", "A", "AL", "Driver", "insert_ignore", "ledger_spend"]

W = table_of(BudgetWindowRow)
R = table_of(BudgetReservationRow)
A = table_of(BudgetApprovalRow)
AL = table_of(BudgetAlertRow)

# Approved extra amounts of a window that are still valid (status, error messages).
_APPROVED = func.coalesce(
    select(func.sum(A.c.extra))
    .where(A.c.window_id == bindparam("wid"),
           or_(A.c.expires_at.is_(None), A.c.expires_at > bindparam("now")))
    .scalar_subquery(), 0)
# The hot path is plain SQL on the driver's connection (SQLAlchemy's per-statement work
# cost more than the statements themselves). ``:name`` parameters; rewritten for psycopg.
# The one statement that decides admission (see the module docstring):
_RESERVE_SQL = """
UPDATE budgetkit_budget_window SET reserved = reserved + :amount
WHERE id = :wid AND spent + reserved + :amount <= :cap + COALESCE(
    (SELECT SUM(extra) FROM budgetkit_budget_approval
     WHERE window_id = :wid AND (expires_at IS NULL OR expires_at > :now)), 0)
RETURNING spent, reserved"""
_HOLD_SQL = """
INSERT INTO budgetkit_budget_reservation (ticket_id, window_id, amount, expires_at)
VALUES (:ticket, :wid, :amount, :expires)"""
_UNHOLD_MANY_SQL = """
DELETE FROM budgetkit_budget_reservation WHERE ticket_id IN ({tickets})
RETURNING ticket_id, window_id, amount"""
_SETTLE_SQL = """
UPDATE budgetkit_budget_window SET spent = spent + :actual, reserved = reserved - :held
WHERE id = :wid RETURNING spent, reserved"""
_UNRESERVE_SQL = """
UPDATE budgetkit_budget_window SET reserved = reserved + :amount WHERE id = :wid"""
_GROW_HOLD_SQL = """
UPDATE budgetkit_budget_reservation SET amount = amount + :amount
WHERE ticket_id = :ticket AND window_id = :wid RETURNING amount"""


@functools.lru_cache(maxsize=64)
def _reserve_many_sql(count: int, dialect: str) -> str:
    """:data:`_RESERVE_SQL` for ``count`` windows at once (params w0.., a0.., c0..).

    On PostgreSQL the rows are first locked in id order (as every other budget
    transaction takes them), because a multi-row UPDATE locks in scan order and two
    such orders could deadlock. SQLite locks the whole database, so it needs no order.
    """
    table = "budgetkit_budget_window"
    # SQLite's RETURNING cannot name an alias, so each dialect gets its own spelling.
    row = "w" if dialect == "postgresql" else table

    def case(param: str) -> str:
        whens = " ".join(f"WHEN :w{i} THEN :{param}{i}" for i in range(count))
        return f"(CASE {row}.id {whens} END)"

    ids = ", ".join(f":w{i}" for i in range(count))
    approved = f"""COALESCE(
    (SELECT SUM(extra) FROM budgetkit_budget_approval
     WHERE window_id = {row}.id AND (expires_at IS NULL OR expires_at > :now)), 0)"""
    if dialect == "postgresql":
        return f"""
WITH locked AS MATERIALIZED (SELECT id FROM {table} WHERE id IN ({ids}) ORDER BY id FOR UPDATE)
UPDATE {table} AS w SET reserved = w.reserved + {case("a")} FROM locked
WHERE w.id = locked.id AND w.spent + w.reserved + {case("a")} <= {case("c")} + {approved}
RETURNING w.id, w.spent, w.reserved"""
    return f"""
UPDATE {table} SET reserved = reserved + {case("a")}
WHERE id IN ({ids}) AND spent + reserved + {case("a")} <= {case("c")} + {approved}
RETURNING id, spent, reserved"""


@functools.lru_cache(maxsize=64)
def _settle_many_sql(count: int) -> str:
    """:data:`_SETTLE_SQL` for ``count`` windows at once (params w0.., s0.., h0..).

    The caller locks the rows in id order first on PostgreSQL (see ``_lock_windows``).
    """
    def case(param: str) -> str:
        whens = " ".join(f"WHEN :w{i} THEN :{param}{i}" for i in range(count))
        return f"(CASE id {whens} END)"

    ids = ", ".join(f":w{i}" for i in range(count))
    return f"""
UPDATE budgetkit_budget_window
SET spent = spent + {case("s")}, reserved = reserved - {case("h")}
WHERE id IN ({ids}) RETURNING id, spent, reserved"""


@functools.lru_cache(maxsize=64)
def _hold_many_sql(count: int) -> str:
    values = ", ".join(f"(:ticket, :w{i}, :a{i}, :expires)" for i in range(count))
    return ("INSERT INTO budgetkit_budget_reservation (ticket_id, window_id, amount, "
            f"expires_at) VALUES {values}")


class Driver:
    """Runs the hot-path SQL on a pooled DBAPI connection, one transaction at a time.

    SQLite keeps datetimes as text; we write them exactly as SQLAlchemy's ``DateTime``
    does, so the Core queries elsewhere compare them correctly.
    """

    def __init__(self, store: Any) -> None:
        self.engine = store.engine
        self.dialect = store.engine.dialect.name
        self.raw = self.dialect in ("sqlite", "postgresql")
        dbapi = getattr(store.engine.dialect, "loaded_dbapi", None)
        #: What a failed statement raises: SQLAlchemy's errors, or the driver's own.
        self.errors: tuple[type[BaseException], ...] = (
            (SQLAlchemyError, dbapi.Error) if dbapi is not None else (SQLAlchemyError,))
        #: PostgreSQL only: False commits without waiting for the WAL flush (see
        #: ``Engine.configure_budgets(durable=...)``).
        self.durable = True
        self._sql: dict[str, Any] = {}
        self._idle: list[Any] = []
        self._idle_pid = os.getpid()
        self._idle_lock = threading.Lock()
        self._durable_mode: dict[int, bool] = {}  # PostgreSQL: synchronous_commit per connection
        # SQLite transactions are serialised by the book's lock: one connection is enough.
        self.max_idle = 1 if self.dialect == "sqlite" else 8

    def sql(self, text_sql: str) -> Any:
        compiled = self._sql.get(text_sql)
        if compiled is None:
            if self.dialect == "postgresql":
                compiled = re.sub(r":(\w+)", r"%(\1)s", text_sql)
            elif self.dialect == "sqlite":
                compiled = text_sql
            else:
                compiled = text(text_sql)
            self._sql[text_sql] = compiled
        return compiled

    def time(self, value: dt.datetime) -> Any:
        return value.strftime("%Y-%m-%d %H:%M:%S.%f") if self.dialect == "sqlite" else value

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Callable[..., list[Any]]]:
        """Yields ``run(sql, params)`` (or a list of params: executemany) -> rows."""
        if not self.raw:
            with self.engine.begin() as conn:
                def run_sa(sql: str, params: Any) -> list[Any]:
                    result = conn.execute(self.sql(sql), params)
                    return list(result.all()) if result.returns_rows else []
                yield run_sa
            return
        connection = self._acquire()
        healthy = True
        durable = self.durable
        try:
            cursor = connection.cursor()
            if self.dialect == "postgresql" and self._durable_mode.get(id(connection),
                                                                        True) != durable:
                # a session setting on our own connection: no extra round trip per call
                cursor.execute(f"SET synchronous_commit TO {'ON' if durable else 'OFF'}")

            def run(sql: str, params: Any) -> list[Any]:
                if isinstance(params, list):
                    cursor.executemany(self.sql(sql), params)
                    return []
                cursor.execute(self.sql(sql), params)
                return cursor.fetchall() if cursor.description else []

            yield run
            connection.commit()
            if self.dialect == "postgresql":
                self._durable_mode[id(connection)] = durable
        except BaseException:
            try:
                connection.rollback()
            except Exception:  # the connection itself is broken: drop it
                healthy = False
            raise
        finally:
            self._release(connection, healthy)

    # Our own few idle connections: SQLAlchemy's pool would ping PostgreSQL on every
    # checkout and roll back on every return, two round trips per transaction.
    def _acquire(self) -> Any:
        with self._idle_lock:
            if self._idle_pid != os.getpid():  # forked: the parent's connections are not ours
                self._idle, self._idle_pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        fairy = self.engine.raw_connection()
        fairy.detach()  # ours now; close() really closes it
        return fairy

    def _release(self, connection: Any, healthy: bool) -> None:
        with self._idle_lock:
            if healthy and len(self._idle) < self.max_idle and self._idle_pid == os.getpid():
                self._idle.append(connection)
                return
        self._durable_mode.pop(id(connection), None)
        try:
            connection.close()
        except Exception:  # already broken
            pass

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            self._release(connection, False)


def insert_ignore(store: Any, table: Table) -> Insert | None:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the store's dialect (None: plain insert)."""
    name = store.engine.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        return sqlite_insert(table).on_conflict_do_nothing()
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert
        return postgresql_insert(table).on_conflict_do_nothing()
    return None


def ledger_spend(conn: Any, budget: Budget, key: str, start: dt.datetime,
                 end: dt.datetime | None) -> int:
    """What the usage ledger already holds for a window that is being created.

    A budget added (or given a new period) mid-window counts the window's earlier spend,
    and only that (LiteLLM #34492 counted everything ever spent). Rows still queued in a
    writer are not seen.
    """
    if not budget.count_earlier_spend:
        return 0
    from budgetkit.ledger import UsageRow, UsageTagRow

    usage = table_of(UsageRow)
    tags = table_of(UsageTagRow)
    parts = key.split("\x1f") if key else []
    run = next((part[4:] for part in parts if part.startswith("run:")), None)
    value = next((part for part in parts if not part.startswith("run:")), None)
    if run is not None and run.startswith("probe-"):
        return 0
    amount = (usage.c.cost_nanos if budget.unit == "usd"
              else usage.c.input_tokens + usage.c.output_tokens)
    query = select(func.coalesce(func.sum(amount), 0)).where(
        usage.c.status.in_(("ok", "error")))
    if budget.period not in ("run", "total"):
        query = query.where(usage.c.created_at >= start)
    if end is not None:
        query = query.where(usage.c.created_at < end)
    if budget.provider is not None:
        query = query.where(usage.c.provider == budget.provider)
    if run is not None:
        query = query.where(or_(usage.c.root_run_id == run, usage.c.run_id == run))
    if budget.scope != "global":
        pattern = budget.match if budget.match is not None else value
        if pattern is None:
            return 0
        like = any(ch in pattern for ch in "*?")
        column = {"user": usage.c.user_id, "project": usage.c.project,
                  "model": usage.c.model, "operation": usage.c.operation_type,
                  "run": usage.c.root_run_id, "tag": tags.c.tag}[budget.scope]

        def matches(col: Any) -> Any:
            return (col.like(pattern.replace("%", r"\%").replace("_", r"\_")
                             .replace("*", "%").replace("?", "_"), escape="\\")
                    if like else col == pattern)

        if budget.scope == "tag":
            query = query.where(usage.c.id.in_(select(tags.c.usage_id).where(matches(column))))
        elif budget.scope == "run":
            query = query.where(or_(matches(usage.c.root_run_id), matches(usage.c.run_id)))
        else:
            query = query.where(matches(column))
            if budget.exclude:
                query = query.where(column.not_in(budget.exclude))
    return int(conn.execute(query).scalar() or 0)
