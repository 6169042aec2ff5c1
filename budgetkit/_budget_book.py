"""The budget book: reserve, settle, release, approve and report budget windows.

How it holds across threads and processes:

- Each budget window is one row. Reserving is ``UPDATE ... SET reserved = reserved + x
  WHERE id = w AND spent + reserved + x <= stop + approved_extra``: the check and the
  reserve are one statement, so two processes cannot both take the last dollar (SQLite
  serialises writers; PostgreSQL re-checks the WHERE on the row's newest version).
- One transaction per admit covers every window that applies, in window-id order (no
  deadlocks); if any window has no room the whole admit rolls back.
- Windows are created on demand with ``INSERT ... ON CONFLICT DO NOTHING`` and their ids
  cached, so concurrent first calls of a new user meet one row and one limit.
- Each reservation is also a row with an expiry. Whoever deletes that row (settle,
  release, or the reaper of expired reservations) gives the amount back: exactly once,
  even when a process died between reserve and settle.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import functools
import logging
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.sql.expression import bindparam

from ._alerts import Alert, AlertSink, LoggingSink
from ._budget_tables import (BudgetAlertRow, BudgetApprovalRow, BudgetReservationRow,
                             BudgetWindowRow)
from ._budgets import UNLIMITED, Budget, window_bounds
from ._errors import ApprovalRequired, BudgetExceeded, ConfigurationError

__all__ = ["BudgetBook", "BudgetStatus", "Approval", "Reservation",
           "DEFAULT_RESERVATION_TIMEOUT"]

logger = logging.getLogger("budgetkit")

#: Seconds after which a reservation that was never settled is given back (a process
#: killed mid-call). Longer than any sane model call; configurable per engine.
DEFAULT_RESERVATION_TIMEOUT = 900.0
#: SQLite: how long (wall seconds) queued settles wait for an admit to carry them.
SETTLE_DELAY = 0.02
#: How often (engine-clock seconds) admit sweeps every expired reservation.
REAP_INTERVAL = 60.0

W = BudgetWindowRow.__table__  # type: ignore[attr-defined]
R = BudgetReservationRow.__table__  # type: ignore[attr-defined]
A = BudgetApprovalRow.__table__  # type: ignore[attr-defined]
AL = BudgetAlertRow.__table__  # type: ignore[attr-defined]

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
def _hold_many_sql(count: int) -> str:
    values = ", ".join(f"(:ticket, :w{i}, :a{i}, :expires)" for i in range(count))
    return ("INSERT INTO budgetkit_budget_reservation (ticket_id, window_id, amount, "
            f"expires_at) VALUES {values}")


class _Driver:
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
        # SQLite: our transactions are serialised by the book's lock anyway, so one
        # connection kept for them saves a pool checkout per transaction.
        self._own: Any = None

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
        keep = self.dialect == "sqlite"
        connection = self._own if keep and self._own is not None else self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            if not self.durable and self.dialect == "postgresql":
                cursor.execute("SET LOCAL synchronous_commit TO OFF")

            def run(sql: str, params: Any) -> list[Any]:
                if isinstance(params, list):
                    cursor.executemany(self.sql(sql), params)
                    return []
                cursor.execute(self.sql(sql), params)
                return cursor.fetchall() if cursor.description else []

            yield run
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            if keep:
                self._own = connection
            else:
                connection.close()

    def close(self) -> None:
        if self._own is not None:
            own, self._own = self._own, None
            own.close()


@dataclass
class Reservation:
    """What a ticket holds in one budget window (``amount`` in the budget's unit)."""

    window_id: int
    budget: Budget
    scope_key: str
    window_start: dt.datetime
    amount: int


@dataclass(frozen=True)
class BudgetStatus:
    """One budget window now: used (settled), reserved (in flight), remaining, level.

    Amounts are dollars for USD budgets and tokens for token budgets. ``limit`` is the
    budget's limit; ``stop`` is where calls stop, including approved extra amounts.
    """

    budget: str
    scope: str
    scope_key: str
    period: str
    unit: str
    window_start: dt.datetime
    window_end: dt.datetime | None
    limit: float
    used: float
    reserved: float
    remaining: float
    percentage: float
    level: str
    approved_extra: float
    stop: float


@dataclass(frozen=True)
class Approval:
    """A lifted critical stop for one window (``extra=None``: no cap until it expires)."""

    id: str
    budget: str
    scope_key: str
    window_start: dt.datetime
    extra: float | None
    expires_at: dt.datetime | None
    approved_by: str | None
    reason: str | None
    created_at: dt.datetime
    active: bool


@dataclass
class _Settlement:
    """A finished ticket waiting for the settler: what it held and what it really used."""

    ticket_id: str
    reservations: list[Reservation]
    held: bool
    cost_nanos: int
    tokens: int


class _NoRoom(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


def _insert_ignore(store: Any, table: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the store's dialect (None: plain insert)."""
    name = store.engine.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        return None
    return dialect_insert(table).on_conflict_do_nothing()


class BudgetBook:
    """Every budget of one engine and its windows in the store. Thread-safe."""

    def __init__(self, store: Any, clock: Callable[[], dt.datetime], *,
                 reservation_timeout: float = DEFAULT_RESERVATION_TIMEOUT,
                 sinks: Sequence[AlertSink] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.reservation_timeout = reservation_timeout
        self.sinks: list[AlertSink] = list(sinks) if sinks is not None else [LoggingSink()]
        self._budgets: dict[str, Budget] = {}
        self._lock = threading.Lock()
        # SQLite has one writer anyway; queueing our threads here beats its busy-wait.
        self._db_lock: threading.Lock | None = threading.Lock() if store.is_sqlite else None
        self._window_ids: dict[tuple[str, str, str, str, dt.datetime], int] = {}
        self._bounds: dict[tuple[str, str], tuple[dt.datetime, dt.datetime | None]] = {}
        self._fired: set[tuple[int, str]] = set()
        self._last_reap: dt.datetime | None = None
        #: Settle on a background thread in batches (False: on the caller's thread).
        self.deferred = True
        #: SQLite: queued settles ride along in the next admit's transaction.
        self.piggyback = bool(store.is_sqlite)
        self._pending: list[_Settlement] = []
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._settler: threading.Thread | None = None
        self._closing = False
        atexit.register(_flush_at_exit, weakref.ref(self))
        self._driver = _Driver(store)
        self._insert_window = _insert_ignore(store, W)
        self._insert_alert = _insert_ignore(store, AL)

    # -- registry ---------------------------------------------------------------------
    def add(self, budget: Budget, *, replace: bool = False) -> Budget:
        if not isinstance(budget, Budget):
            raise ConfigurationError(f"add_budget() takes a Budget, got {type(budget).__name__}")
        with self._lock:
            known = self._budgets.get(budget.name)
            if known is not None and known != budget and not replace:
                raise ConfigurationError(
                    f"budget {budget.name!r}, field 'name': a different budget has this name; "
                    "pass replace=True to redefine it")
            self._budgets = {**self._budgets, budget.name: budget}
        return budget

    def remove(self, name: str) -> None:
        with self._lock:
            self._get(name)
            self._budgets = {k: v for k, v in self._budgets.items() if k != name}

    def budgets(self) -> list[Budget]:
        return list(self._budgets.values())

    def _get(self, name: str) -> Budget:
        budget = self._budgets.get(name)
        if budget is None:
            known = ", ".join(sorted(self._budgets)) or "none"
            raise ConfigurationError(f"unknown budget {name!r}; registered: {known}")
        return budget

    def __bool__(self) -> bool:
        return bool(self._budgets)

    # -- windows ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        if self._db_lock is None:
            with self.store.engine.begin() as conn:
                yield conn
        else:
            with self._db_lock, self.store.engine.begin() as conn:
                yield conn

    @contextlib.contextmanager
    def _fast(self) -> Iterator[Callable[..., list[Any]]]:
        if self._db_lock is None:
            with self._driver.transaction() as run:
                yield run
        else:
            with self._db_lock, self._driver.transaction() as run:
                yield run

    def _window_bounds(self, budget: Budget, now: dt.datetime
                       ) -> tuple[dt.datetime, dt.datetime | None]:
        cache_key = (budget.period, budget.timezone)
        cached = self._bounds.get(cache_key)
        if cached is not None and cached[0] <= now and (cached[1] is None or now < cached[1]):
            return cached
        bounds = window_bounds(budget.period, now, budget.timezone)
        self._bounds[cache_key] = bounds
        return bounds

    def _window_id(self, budget: Budget, key: str, start: dt.datetime,
                   end: dt.datetime | None, now: dt.datetime, *, create: bool = True
                   ) -> int | None:
        cache_key = (budget.name, budget.period, budget.unit, key, start)
        window_id = self._window_ids.get(cache_key)
        if window_id is not None:
            return window_id
        where = (W.c.budget == budget.name, W.c.period == budget.period,
                 W.c.unit == budget.unit, W.c.scope_key == key, W.c.window_start == start)
        values = {"budget": budget.name, "period": budget.period, "unit": budget.unit,
                  "scope_key": key, "window_start": start, "window_end": end,
                  "spent": 0, "reserved": 0, "created_at": now}
        if create:
            with self._transaction() as conn:
                created = None
                if self._insert_window is not None:
                    created = conn.execute(self._insert_window.returning(W.c.id),
                                           values).scalar()
                else:
                    try:
                        with conn.begin_nested():
                            created = conn.execute(insert(W), values).inserted_primary_key[0]
                    except IntegrityError:
                        pass
                if created is not None:
                    window_id = created
                    # Same transaction: no call can have settled into this window yet.
                    earlier = ledger_spend(conn, budget, key, start, end)
                    if earlier:
                        conn.execute(update(W).where(W.c.id == window_id)
                                     .values(spent=W.c.spent + earlier))
                else:
                    window_id = conn.execute(select(W.c.id).where(*where)).scalar_one()
        else:
            with self.store.engine.connect() as conn:
                window_id = conn.execute(select(W.c.id).where(*where)).scalar()
            if window_id is None:
                return None
        if len(self._window_ids) > 50_000:  # bounded: old windows and runs fall out
            self._window_ids.clear()
        self._window_ids[cache_key] = window_id
        return window_id

    def _targets(self, ticket: Any, now: dt.datetime, *, create: bool = True
                 ) -> list[tuple[Budget, str, dt.datetime, int | None]]:
        targets = []
        solo = not (getattr(ticket, "root_run_id", None) or getattr(ticket, "run_id", None))
        for budget in self._budgets.values():
            keys = budget.window_keys(ticket)
            if not keys:
                continue
            start, end = self._window_bounds(budget, now)
            for key in keys:
                if solo and (budget.period == "run"
                             or (budget.scope == "run" and budget.match is None)):
                    # A call outside any run is a run of its own: nothing can share its
                    # window, so it is checked in memory (window id None), not stored.
                    targets.append((budget, key, start, None))
                    continue
                targets.append((budget, key, start,
                                self._window_id(budget, key, start, end, now, create=create)))
        return targets

    # -- the life of a call -----------------------------------------------------------
    def reserve(self, ticket: Any) -> None:
        """Reserve the ticket's worst case in every window that applies, or raise.

        Sets ``ticket.reservations``, ``ticket.decision`` and ``ticket.warnings``.
        Raises :class:`ApprovalRequired` / :class:`BudgetExceeded` and reserves nothing
        when any window lacks room.
        """
        if not self._budgets:
            return
        now = self.clock()
        targets = self._targets(ticket, now)
        if not targets:
            return
        if self._last_reap is None or (now - self._last_reap).total_seconds() >= REAP_INTERVAL:
            self._last_reap = now
            self.reap(now)
        solo = [(None, budget, key, start, _worst_case(budget, ticket))
                for budget, key, start, window_id in targets if window_id is None]
        for _none, budget, key, start, amount in solo:
            if amount > budget.stop_amount:
                raise self._blocked(budget, key, start, None, amount, now)
        plan = sorted(((window_id, budget, key, start, _worst_case(budget, ticket))
                       for budget, key, start, window_id in targets if window_id is not None),
                      key=lambda item: item[0])
        results: list[tuple[int, int]] = []
        for attempt in (1, 2):
            if not plan:
                break
            try:
                results = self._reserve_all(ticket.id, plan, now)
                break
            except _NoRoom as no_room:
                window_id, budget, key, start, amount = plan[no_room.index]
                # Our own finished calls may still hold reservations (queued settles), and
                # reservations of a dead process may be what fills the window.
                if attempt == 1:
                    self.flush()
                    self.reap(now, window_id=window_id)
                    continue
                raise self._blocked(budget, key, start, window_id, amount, now) from None
        plan = [*plan, *solo]
        results = [*results, *((0, item[4]) for item in solo)]
        ticket.reservations = [Reservation(window_id, budget, key, start, amount)
                               for window_id, budget, key, start, amount in plan]
        self._judge(ticket, plan, results)

    def _reserve_all(self, ticket_id: str, plan: Sequence[tuple[Any, ...]],
                     now: dt.datetime) -> list[tuple[int, int]]:
        results: list[tuple[int, int]] = []
        expires = now + dt.timedelta(seconds=self.reservation_timeout)
        at, until = self._driver.time(now), self._driver.time(expires)
        settled: list[tuple[Reservation, int, int]] = []
        taken: list[_Settlement] = []
        try:
            with self._fast() as run:
                if self.piggyback and self._pending:
                    # SQLite: finished calls settle in this admit's transaction (one commit
                    # for both); SQLite's single writer lock means no ordering to keep.
                    with self._pending_lock:
                        taken, self._pending = self._pending, []
                    settled = self._apply_settlements(run, taken)
                self._reserve_in(run, ticket_id, plan, at, until, results)
        except BaseException:
            if taken:  # rolled back with the reservation: queue them again
                with self._pending_lock:
                    self._pending[:0] = taken
            raise
        if settled:
            self._threshold_alerts(settled)
        return results

    def _reserve_in(self, run: Callable[..., list[Any]], ticket_id: str,
                    plan: Sequence[tuple[Any, ...]], at: Any, until: Any,
                    results: list[tuple[int, int]]) -> None:
        if len(plan) == 1:
            window_id, budget, _key, _start, amount = plan[0]
            rows = run(_RESERVE_SQL, {"wid": window_id, "amount": amount,
                                      "cap": budget.stop_amount, "now": at})
            if not rows:
                raise _NoRoom(0)
            results.append((int(rows[0][0]), int(rows[0][1])))
            run(_HOLD_SQL, {"ticket": ticket_id, "wid": window_id, "amount": amount,
                            "expires": until})
            return
        # Every window in one statement; each row is still checked on its own.
        params: dict[str, Any] = {"now": at, "ticket": ticket_id, "expires": until}
        for index, (window_id, budget, _key, _start, amount) in enumerate(plan):
            params.update({f"w{index}": window_id, f"a{index}": amount,
                           f"c{index}": budget.stop_amount})
        sql = _reserve_many_sql(len(plan), self._driver.dialect)
        got = {int(row[0]): (int(row[1]), int(row[2])) for row in run(sql, params)}
        for index, item in enumerate(plan):
            if item[0] not in got:
                raise _NoRoom(index)  # rolls back the windows reserved
            results.append(got[item[0]])
        run(_hold_many_sql(len(plan)), params)

    def _judge(self, ticket: Any, plan: Sequence[tuple[Any, ...]],
               results: Sequence[tuple[int, int]]) -> None:
        """Levels and the downgrade hint from the windows' state after reserving."""
        decision = "allow"
        rank = {"allow": 0, "warn": 1, "review": 2, "downgrade": 3}
        review: list[str] = []
        for (window_id, budget, key, start, _amount), (spent, reserved) in zip(plan, results):
            used = spent + reserved
            level = budget.level_of(used)
            verdict = "allow"
            if level != "normal":
                verdict = "warn" if level == "moderate" else "review"
                ticket.warnings.append(
                    f"budget {budget.name!r} ({budget.describe_key(key)}) at level {level}: "
                    f"{budget.format_amount(used)} of {budget.format_amount(budget.limit_amount)}"
                    " used or reserved")
                if verdict == "review":
                    review.append(budget.name)
                if window_id is not None:  # a lone call's run has no stored window
                    self._alert(window_id, budget, key, start, f"level:{level}", level, None,
                                spent, reserved)
            limit = budget.limit_amount
            if budget.downgrade_below is not None \
                    and max(0, limit - used) / limit < budget.downgrade_below:
                verdict = "downgrade"
            if rank[verdict] > rank[decision]:
                decision = verdict
        ticket.decision = decision
        if review:
            ticket.metadata["budget_review"] = review

    def commit(self, ticket: Any, cost_nanos: int, tokens: int) -> None:
        """The call finished: actual spend replaces what the ticket reserved.

        Settling is queued for the settler thread, which batches many tickets into one
        transaction. Until it runs the ticket's reservation stays in place, which can only
        make admission stricter, never looser; an admit that finds no room settles the
        queue first and tries again.
        """
        reservations: list[Reservation] = list(ticket.reservations)
        held = bool(reservations)
        ticket.reservations = []
        if not held:
            if not self._budgets or (cost_nanos == 0 and tokens == 0):
                return
            # Recorded without admit (embeddings, imports): still counts in its budgets.
            try:
                now = self.clock()
                reservations = [Reservation(window_id, budget, key, start, 0)
                                for budget, key, start, window_id
                                in self._targets(ticket, now)]
            except self._driver.errors:
                logger.exception("budgetkit: could not count ticket %s in its budgets",
                                 ticket.id)
                return
            if not reservations:
                return
        item = _Settlement(ticket.id, reservations, held, cost_nanos, tokens)
        if not self.deferred or self._closing:
            self._settle_batch([item])
            return
        with self._pending_lock:
            self._pending.append(item)
            if self._settler is None or not self._settler.is_alive():
                self._settler = threading.Thread(target=self._settle_forever, daemon=True,
                                                 name="budgetkit-settler")
                self._settler.start()
        self._wake.set()

    def release(self, ticket: Any) -> None:
        """Give back what the ticket reserved (cancelled, failed or blocked elsewhere)."""
        if ticket.reservations:
            self.commit(ticket, 0, 0)

    def flush(self) -> int:
        """Settle every queued ticket now; returns how many were settled."""
        with self._flush_lock:
            with self._pending_lock:
                items, self._pending = self._pending, []
            if items:
                self._settle_batch(items)
            return len(items)

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self.flush()
        with self._db_lock or contextlib.nullcontext():
            self._driver.close()

    def _settle_forever(self) -> None:
        while not self._closing:
            self._wake.wait(1.0)
            self._wake.clear()
            if self.piggyback and not self._closing:
                time.sleep(SETTLE_DELAY)  # the next admit will most likely take them
            try:
                self.flush()
            except Exception:  # keep settling later batches; these reservations expire
                logger.exception("budgetkit: settling budget reservations failed")

    def _settle_batch(self, items: Sequence[_Settlement]) -> None:
        for attempt in range(1, 4):
            try:
                updates = self._settle_rows(items)
                break
            except self._driver.errors:
                if attempt < 3:  # a deadlock victim or a dropped connection: try again
                    continue
                # The reservations expire; the usage rows are still written.
                logger.exception("budgetkit: could not settle %d ticket(s) in their budgets",
                                 len(items))
                return
        self._threshold_alerts(updates)

    def _threshold_alerts(self, updates: Sequence[tuple[Reservation, int, int]]) -> None:
        for item, spent, reserved in updates:
            budget = item.budget
            for threshold in budget.alert_at:
                if spent >= threshold * budget.limit_amount:
                    self._alert(item.window_id, budget, item.scope_key, item.window_start,
                                f"threshold:{threshold:g}", budget.level_of(spent), threshold,
                                spent, reserved)

    def _settle_rows(self, items: Sequence[_Settlement]
                     ) -> list[tuple[Reservation, int, int]]:
        with self._fast() as run:
            return self._apply_settlements(run, items)

    def _apply_settlements(self, run: Callable[..., list[Any]],
                           items: Sequence[_Settlement]) -> list[tuple[Reservation, int, int]]:
        """Settle ``items`` inside the caller's transaction; returns the windows' new state."""
        held_ids = [item.ticket_id for item in items if item.held]
        # window id -> [actual, given back, one of its reservations]
        totals: dict[int, list[Any]] = {}
        updates = []
        held: dict[tuple[str, int], int] = {}
        for start in range(0, len(held_ids), 500):
            chunk = held_ids[start:start + 500]
            names = ", ".join(f":t{index}" for index in range(len(chunk)))
            rows = run(_UNHOLD_MANY_SQL.format(tickets=names),
                       {f"t{index}": ticket_id for index, ticket_id in enumerate(chunk)})
            held.update({(str(t), int(w)): int(a) for t, w, a in rows})
        for item in items:
            for reservation in item.reservations:
                if reservation.window_id is None:  # a lone call's run: nothing stored
                    continue
                actual = item.cost_nanos if reservation.budget.unit == "usd" else item.tokens
                # 0 when never held, or when the reaper already gave it back
                give_back = held.get((item.ticket_id, reservation.window_id), 0)
                total = totals.setdefault(reservation.window_id, [0, 0, reservation])
                total[0] += actual
                total[1] += give_back
        for window_id in sorted(totals):  # window-id order, as reserve: no deadlocks
            actual, give_back, reservation = totals[window_id]
            if actual == 0 and give_back == 0:
                continue
            rows = run(_SETTLE_SQL, {"wid": window_id, "actual": actual,
                                     "held": give_back})
            if rows and actual:
                updates.append((reservation, int(rows[0][0]), int(rows[0][1])))
        return updates

    def check_stream(self, ticket: Any, output_tokens: int) -> None:
        """Raise :class:`BudgetExceeded` when a streaming call outgrew its reservation in a
        budget that stops streams and the window has no room to grow it."""
        if ticket.done or not ticket.reservations:
            return
        for item in ticket.reservations:
            budget = item.budget
            if not budget.stops_streams:
                continue
            if budget.unit == "usd":
                needed = ticket.price.cost_nanos(ticket.input_tokens, output_tokens)
            else:
                needed = ticket.input_tokens + output_tokens
            if needed <= item.amount:
                continue  # the common case: no database trip per token
            now = self.clock()
            if item.window_id is None:  # a lone call's run: its own stop is the only limit
                if needed > budget.stop_amount:
                    raise self._blocked(budget, item.scope_key, item.window_start, None,
                                        needed, now, streaming=True)
                item.amount = needed
                continue
            grow_by = [max(needed - item.amount, item.amount // 4, 1), needed - item.amount]
            for grow in dict.fromkeys(grow_by):
                if self._grow(ticket.id, item, grow, now):
                    break
            else:
                raise self._blocked(budget, item.scope_key, item.window_start, item.window_id,
                                    needed - item.amount, now, streaming=True)

    def _grow(self, ticket_id: str, item: Reservation, grow: int, now: dt.datetime) -> bool:
        try:
            with self._fast() as run:
                if not run(_RESERVE_SQL, {"wid": item.window_id, "amount": grow,
                                          "cap": item.budget.stop_amount,
                                          "now": self._driver.time(now)}):
                    return False
                if not run(_GROW_HOLD_SQL, {"ticket": ticket_id, "wid": item.window_id,
                                            "amount": grow}):
                    raise _NoRoom(0)  # reaped meanwhile: undo, stream on what is settled
        except _NoRoom:
            return True
        item.amount += grow
        return True

    # -- expiry -----------------------------------------------------------------------
    def reap(self, now: dt.datetime | None = None, *, window_id: int | None = None) -> int:
        """Give back reservations older than the timeout; returns the amount reclaimed."""
        now = now or self.clock()
        query = select(R.c.ticket_id, R.c.window_id, R.c.amount).where(R.c.expires_at < now)
        if window_id is not None:
            query = query.where(R.c.window_id == window_id)
        with self.store.engine.connect() as conn:
            expired = conn.execute(query.limit(1000)).all()
        if not expired:
            return 0
        reclaimed = 0
        for ticket_id, wid, amount in expired:
            # One small transaction each: never holds two locks a settle might want.
            with self._transaction() as conn:
                gone = conn.execute(delete(R).where(R.c.ticket_id == ticket_id,
                                                    R.c.window_id == wid)).rowcount
                if gone:  # we won the delete, so we give the amount back
                    conn.execute(update(W).where(W.c.id == wid)
                                 .values(reserved=W.c.reserved - amount))
                    reclaimed += int(amount)
        if reclaimed:
            logger.warning("budgetkit: reclaimed %d expired budget reservation(s)", len(expired))
        return reclaimed

    # -- blocking, alerts -------------------------------------------------------------
    def _blocked(self, budget: Budget, key: str, start: dt.datetime, window_id: int | None,
                 amount: int, now: dt.datetime, *, streaming: bool = False) -> BudgetExceeded:
        spent = reserved = extra = 0
        if window_id is not None:
            with self.store.engine.connect() as conn:
                row = conn.execute(select(W.c.spent, W.c.reserved)
                                   .where(W.c.id == window_id)).one()
                extra = int(conn.execute(select(_APPROVED),
                                         {"wid": window_id, "now": now}).scalar() or 0)
            spent, reserved = int(row[0]), int(row[1])
        level = budget.level_of(spent + reserved + amount)
        fmt = budget.format_amount
        window = (f"{budget.period} window {start.isoformat(sep=' ')} UTC"
                  if budget.period not in ("run", "total") else f"{budget.period} window")
        stop = budget.stop_amount + extra
        what = "streaming call outgrew its reservation" if streaming else "call"
        message = (f"budget {budget.name!r} ({budget.describe_key(key)}, {window}) stops this "
                   f"{what}: needs {fmt(amount)}, spent {fmt(spent)}, "
                   f"reserved {fmt(reserved)}, limit {fmt(budget.limit_amount)}"
                   f"{f' (stops at {fmt(stop)})' if stop != budget.limit_amount else ''}, "
                   f"level {level}")
        if budget.require_approval and window_id is not None:
            value = key.split("\x1f")[0] if key and not key.startswith("run:") else None
            run = next((part[4:] for part in key.split("\x1f") if part.startswith("run:")),
                       None)
            args = "".join([repr(budget.name), f", key={value!r}" if value else "",
                            f", run_id={run!r}" if run else ""])
            message += f"; engine.approve({args}) lifts the stop for this window"
        error_type = (ApprovalRequired if budget.require_approval and window_id is not None
                      else BudgetExceeded)
        if window_id is not None:
            self._alert(window_id, budget, key, start, "blocked", "critical", None, spent,
                        reserved)
        return error_type(message, budget=budget.name, window=start, scope_key=key,
                          spent=budget.to_unit(spent), reserved=budget.to_unit(reserved),
                          limit=budget.to_unit(budget.limit_amount), level=level,
                          needed=budget.to_unit(amount), unit=budget.unit)

    def _alert(self, window_id: int, budget: Budget, key: str, start: dt.datetime, kind: str,
               level: str, threshold: float | None, spent: int, reserved: int) -> None:
        """Fire once per (window, kind) across processes: the stored row decides."""
        marker = (window_id, kind)
        if marker in self._fired:
            return
        if len(self._fired) > 100_000:  # bounded; the stored row still dedupes
            self._fired.clear()
        self._fired.add(marker)
        now = self.clock()
        limit = budget.limit_amount
        percentage = 100.0 * spent / limit
        fmt = budget.format_amount
        what = {"threshold": f"reached {100 * (threshold or 0):g}% of its limit",
                "level": f"is at level {level} (used or reserved {fmt(spent + reserved)})",
                "blocked": "stopped a call (critical)"}[kind.split(":")[0]]
        message = (f"budget {budget.name!r} ({budget.describe_key(key)}, {budget.period}) {what}: "
                   f"spent {fmt(spent)} of {fmt(limit)} ({percentage:.1f}%)")
        values = {"window_id": window_id, "kind": kind, "budget": budget.name,
                  "period": budget.period, "unit": budget.unit, "scope_key": key,
                  "window_start": start, "level": level, "spent": spent, "reserved": reserved,
                  "limit_amount": limit, "message": message, "created_at": now}
        try:
            with self._transaction() as conn:
                if self._insert_alert is not None:
                    won = conn.execute(self._insert_alert.returning(AL.c.id),
                                       values).first() is not None
                else:
                    try:
                        with conn.begin_nested():
                            conn.execute(insert(AL), values)
                        won = True
                    except IntegrityError:
                        won = False
        except (DBAPIError, SQLAlchemyError):
            logger.exception("budgetkit: could not store alert %s", message)
            won = True  # better a duplicate alert than none
        if not won:
            return
        alert = Alert(budget=budget.name, kind=kind.split(":")[0], level=level,
                      threshold=threshold, period=budget.period, unit=budget.unit,
                      scope_key=key, window_start=start, spent=budget.to_unit(spent),
                      reserved=budget.to_unit(reserved), limit=budget.to_unit(limit),
                      percentage=percentage, message=message, created_at=now)
        for sink in list(self.sinks):
            try:
                sink(alert)
            except Exception:  # a sink's bug must not break the user's call
                logger.exception("budgetkit: alert sink %r failed", sink)

    def alerts(self, *, budget: str | None = None, since: dt.datetime | None = None
               ) -> list[Alert]:
        self.flush()
        query = select(AL).order_by(AL.c.created_at, AL.c.id)
        if budget is not None:
            query = query.where(AL.c.budget == budget)
        if since is not None:
            query = query.where(AL.c.created_at >= since)
        with self.store.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        out = []
        for row in rows:
            kind, _, threshold = row["kind"].partition(":")
            known = self._budgets.get(row["budget"])
            to_unit = known.to_unit if known is not None and known.unit == row["unit"] else (
                (lambda a: a / 1e9) if row["unit"] == "usd" else float)
            out.append(Alert(
                budget=row["budget"], kind=kind, level=row["level"],
                threshold=float(threshold) if kind == "threshold" else None,
                period=row["period"], unit=row["unit"], scope_key=row["scope_key"],
                window_start=row["window_start"], spent=to_unit(row["spent"]),
                reserved=to_unit(row["reserved"]), limit=to_unit(row["limit_amount"]),
                percentage=100.0 * row["spent"] / row["limit_amount"],
                message=row["message"], created_at=row["created_at"]))
        return out

    # -- approvals --------------------------------------------------------------------
    def approve(self, name: str, *, extra: float | None = None,
                expires: dt.datetime | dt.timedelta | float | None = None,
                by: str | None = None, key: str | None = None, run_id: str | None = None,
                reason: str | None = None) -> Approval:
        budget = self._get(name)
        now = self.clock()
        each = budget.scope != "global" and budget.match is None
        if each and key is None:
            raise ConfigurationError(f"budget {name!r}, field 'key': this budget holds for each "
                                     f"{budget.scope}; say which one (key=...)")
        if budget.period == "run" and run_id is None and not (budget.scope == "run" and key):
            raise ConfigurationError(f"budget {name!r}, field 'run_id': a per-run budget needs "
                                     "the run to approve (run_id=...)")
        scope_key = key if each and key is not None else ""
        if budget.period == "run":
            run = run_id or key
            scope_key = (f"{scope_key}\x1frun:{run}" if scope_key and budget.scope != "run"
                         else f"run:{run}")
        if extra is not None:
            if isinstance(extra, bool) or not isinstance(extra, (int, float)) or extra <= 0:
                raise ConfigurationError(f"budget {name!r}, field 'extra': must be a positive "
                                         f"amount, got {extra!r}")
            amount = budget.amount_of(extra)
        else:
            amount = UNLIMITED
        if isinstance(expires, dt.timedelta):
            expires_at: dt.datetime | None = now + expires
        elif isinstance(expires, (int, float)) and not isinstance(expires, bool):
            expires_at = now + dt.timedelta(seconds=expires)
        elif isinstance(expires, dt.datetime):
            expires_at = (expires.astimezone(dt.timezone.utc).replace(tzinfo=None)
                          if expires.tzinfo else expires)
        elif expires is None:
            expires_at = None
        else:
            raise ConfigurationError(f"budget {name!r}, field 'expires': use a datetime, "
                                     f"timedelta or seconds, got {expires!r}")
        start, end = self._window_bounds(budget, now)
        window_id = self._window_id(budget, scope_key, start, end, now)
        assert window_id is not None
        approval_id = f"{time.time_ns():016x}{uuid.uuid4().hex[:16]}"  # sorts by time
        with self._transaction() as conn:
            conn.execute(insert(A), {
                "id": approval_id, "window_id": window_id, "budget": name,
                "scope_key": scope_key, "window_start": start, "extra": amount,
                "unlimited": extra is None, "expires_at": expires_at, "approved_by": by,
                "reason": reason, "created_at": now})
        logger.warning("budgetkit: budget %r approved by %s for window %s (%s)", name,
                       by or "unknown", start, "no cap" if extra is None else f"+{extra}")
        return Approval(approval_id, name, scope_key, start,
                        None if extra is None else budget.to_unit(amount), expires_at, by,
                        reason, now, True)

    def approvals(self, *, budget: str | None = None, active: bool | None = None
                  ) -> list[Approval]:
        now = self.clock()
        query = select(A).order_by(A.c.created_at, A.c.id)
        if budget is not None:
            query = query.where(A.c.budget == budget)
        with self.store.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        out = []
        for row in rows:
            known = self._budgets.get(row["budget"])
            is_active = row["expires_at"] is None or row["expires_at"] > now
            if known is not None and known.period not in ("run", "total"):
                is_active = is_active and row["window_start"] == \
                    self._window_bounds(known, now)[0]
            if active is not None and is_active != active:
                continue
            amount = None if row["unlimited"] else (
                known.to_unit(row["extra"]) if known is not None else float(row["extra"]))
            out.append(Approval(row["id"], row["budget"], row["scope_key"], row["window_start"],
                                amount, row["expires_at"], row["approved_by"], row["reason"],
                                row["created_at"], is_active))
        return out

    # -- reading ----------------------------------------------------------------------
    def status(self, *, budget: str | None = None, key: str | None = None,
               max_windows: int = 200) -> list[BudgetStatus]:
        self.flush()
        now = self.clock()
        self.reap(now)
        chosen = [self._get(budget)] if budget is not None else list(self._budgets.values())
        out: list[BudgetStatus] = []
        for item in chosen:  # a shared window is opened (and back-filled) to report it
            if item.scope == "global" and item.period != "run":
                self._window_id(item, "", *self._window_bounds(item, now), now)
        with self.store.engine.connect() as conn:
            for item in chosen:
                start, end = self._window_bounds(item, now)
                query = (select(W.c.id, W.c.scope_key, W.c.window_start, W.c.window_end,
                                W.c.spent, W.c.reserved)
                         .where(W.c.budget == item.name, W.c.period == item.period,
                                W.c.unit == item.unit, W.c.window_start == start)
                         .order_by(W.c.id.desc()).limit(max_windows))
                if key is not None:
                    query = query.where(or_(W.c.scope_key == key,
                                            W.c.scope_key.like(f"{key}\x1f%")))
                rows = conn.execute(query).all()
                for window_id, scope_key, w_start, w_end, spent, reserved in rows:
                    extra = 0
                    if window_id is not None:
                        extra = int(conn.execute(select(_APPROVED),
                                                 {"wid": window_id, "now": now}).scalar() or 0)
                    out.append(_status(item, scope_key, w_start, w_end, int(spent),
                                       int(reserved), extra))
        return out

    def headroom(self, ticket: Any) -> float | None:
        """Smallest remaining fraction (0..1) of the limits that apply; None if none do."""
        if not self._budgets:
            return None
        self.flush()
        now = self.clock()
        targets = self._targets(ticket, now, create=False)
        if not targets:
            return None
        ids = [window_id for *_rest, window_id in targets if window_id is not None]
        used: dict[int, int] = {}
        if ids:
            with self.store.engine.connect() as conn:
                used = {int(w): int(s) + int(r) for w, s, r in conn.execute(
                    select(W.c.id, W.c.spent, W.c.reserved).where(W.c.id.in_(ids))).all()}
        fractions = []
        for budget, _key, _start, window_id in targets:
            limit = budget.limit_amount
            fractions.append(max(0.0, (limit - used.get(window_id or -1, 0)) / limit))
        return min(fractions)


def ledger_spend(conn: Any, budget: Budget, key: str, start: dt.datetime,
                 end: dt.datetime | None) -> int:
    """What the usage ledger already holds for a window that is being created.

    A budget added (or given a new period) mid-window counts the window's earlier spend,
    and only that (LiteLLM #34492 counted everything ever spent). Rows still queued in a
    writer are not seen.
    """
    if not budget.count_earlier_spend:
        return 0
    from ._tables import UsageRow, UsageTagRow

    usage = UsageRow.__table__  # type: ignore[attr-defined]
    tags = UsageTagRow.__table__  # type: ignore[attr-defined]
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


def _flush_at_exit(book_ref: weakref.ref[BudgetBook]) -> None:
    book = book_ref()
    if book is not None and book._pending:
        try:
            book.flush()
        except Exception:  # at exit: the reservations expire anyway
            logger.exception("budgetkit: settling budgets at exit failed")


def _worst_case(budget: Budget, ticket: Any) -> int:
    if budget.unit == "usd":
        return int(ticket.worst_case_nanos)
    return int(ticket.input_tokens + ticket.max_output_tokens)


def _status(budget: Budget, key: str, start: dt.datetime, end: dt.datetime | None, spent: int,
            reserved: int, extra: int) -> BudgetStatus:
    limit = budget.limit_amount
    stop = budget.stop_amount + extra
    return BudgetStatus(
        budget=budget.name, scope=budget.describe_key(key), scope_key=key, period=budget.period,
        unit=budget.unit, window_start=start, window_end=end, limit=budget.to_unit(limit),
        used=budget.to_unit(spent), reserved=budget.to_unit(reserved),
        remaining=budget.to_unit(max(0, limit - spent - reserved)),
        percentage=100.0 * spent / limit, level=budget.level_of(spent + reserved),
        approved_extra=budget.to_unit(min(extra, UNLIMITED)),
        stop=budget.to_unit(stop) if extra < UNLIMITED else float("inf"))


def attribution_ticket(*, model: str | None = None, user_id: str | None = None,
                       project: str | None = None, tags: Iterable[str] = (),
                       operation_type: str | None = None, run_id: str | None = None,
                       provider: str | None = None, price: Any = None) -> Any:
    """A stand-in ticket carrying only attribution (for headroom questions)."""
    return SimpleNamespace(id=f"probe-{uuid.uuid4().hex}", model=model or "", provider=provider,
                           price=price,
                           user_id=user_id, project=project, tags=tuple(tags),
                           operation_type=operation_type, run_id=run_id, root_run_id=run_id)
