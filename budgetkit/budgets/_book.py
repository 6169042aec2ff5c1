"""The budget book: reserve, settle, release, approve and report budget windows.

How it holds across threads and processes:

- Each budget window is one row. Reserving is ``UPDATE ... SET reserved = reserved + x
  WHERE id = w AND spent + reserved + x <= stop + approved_extra``: the check and the
  reserve are one statement, so two processes cannot both take the last dollar (SQLite
  serialises writers; PostgreSQL re-checks the WHERE on the row's newest version).
- One statement and one transaction per admit cover every window that applies; if any
  window has no room the whole admit rolls back. Window rows are always locked in id
  order, and before any reservation row, so transactions never wait in a cycle.
- Windows are created on demand with ``INSERT ... ON CONFLICT DO NOTHING`` and their ids
  cached, so concurrent first calls of a new user meet one row and one limit.
- Each reservation is also a row with an expiry. Whoever deletes that row (settle,
  release, or the reaper of expired reservations) gives the amount back: exactly once,
  even when a process died between reserve and settle. The expiry is short
  (``reservation_timeout``, 60 s) and a live process renews it while the call runs (the
  settler thread, every third of the timeout: a heartbeat), so a long call keeps its hold
  and a killed process's holds come back within the timeout.
- Settling is queued: it rides in the next admit's transaction (one commit per call) or a
  background thread does it shortly after. A queued settle only keeps a reservation a
  little longer, which can make admission stricter, never looser; an admit that finds no
  room settles the queue and tries again.

Over 500 lines because the book is the one place where a reservation's protocol (reserve,
grow, settle, release, reap) is written down; windows, verdicts, status, leases and lanes,
which it composes, live in their own modules.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update

from budgetkit.errors import ConfigurationError

from ._alerts import AlertSink, LoggingSink
from ._budget import Budget
from ._lease import LEASE_SYNC, LeaseDesk
from ._reservation import Reservation
from ._shared import POLL_INTERVAL, SharedBudgets
from ._sql import (
    _GROW_HOLD_SQL,
    _HOLD_SQL,
    _RESERVE_SQL,
    _SETTLE_SQL,
    _UNHOLD_MANY_SQL,
    _UNRESERVE_SQL,
    AL,
    Driver,
    R,
    W,
    _hold_many_sql,
    _reserve_many_sql,
    _settle_many_sql,
    insert_ignore,
)
from ._status import Approval, BudgetReader, BudgetStatus, attribution_ticket
from ._verdicts import Verdicts
from ._windows import Windows

__all__ = ["BudgetBook", "BudgetStatus", "Approval", "Reservation", "attribution_ticket",
           "DEFAULT_RESERVATION_TIMEOUT"]

logger = logging.getLogger("budgetkit")

#: Seconds after which a reservation nobody renewed is given back (its process was killed
#: mid-call). A live process renews its holds every third of this while the calls run, so
#: it bounds how long a dead process's money stays held, not how long a call may take.
DEFAULT_RESERVATION_TIMEOUT = 60.0
#: How long (wall seconds) queued settles wait for an admit to carry them.
SETTLE_DELAY = 0.02
#: How often (engine-clock seconds) admit sweeps every expired reservation.
REAP_INTERVAL = 60.0


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


class BudgetBook(Windows, Verdicts, BudgetReader):
    """Every budget of one engine and its windows in the store. Thread-safe."""

    def __init__(self, store: Any, clock: Callable[[], dt.datetime], *,
                 reservation_timeout: float = DEFAULT_RESERVATION_TIMEOUT,
                 sinks: Sequence[AlertSink] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.reservation_timeout = reservation_timeout
        self.sinks: list[AlertSink] = list(sinks) if sinks is not None else [LoggingSink()]
        # What this book enforces: the ledger's stored budgets, then this engine's local
        # ones over them. Replaced whole on every change (readers take it without a lock).
        self._budgets: dict[str, Budget] = {}
        self._local: dict[str, Budget] = {}
        self._shared: dict[str, Budget] = {}
        self._shared_version = -1
        self._poll_at = 0.0  # monotonic time of the next look at the ledger's registry
        self._poll_failing = False
        self.registry = SharedBudgets(store)
        self._lock = threading.Lock()
        # SQLite has one writer anyway; queueing our threads here beats its busy-wait.
        self._db_lock: threading.Lock | None = threading.Lock() if store.is_sqlite else None
        self._window_ids: dict[tuple[str, str, str, str, dt.datetime], int] = {}
        self._targets_of: dict[str, Budget] | None = None  # the budgets _target_cache is of
        self._target_cache: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._run_scoped = False
        self._bounds: dict[tuple[str, str], tuple[dt.datetime, dt.datetime | None]] = {}
        self._fired: set[tuple[int, str]] = set()
        self._next_reap: dt.datetime | None = None  # admit sweeps expired reservations then
        # Calls holding reservation rows: ticket id -> when (monotonic) the row's expiry was
        # last set. The settler renews those older than a third of the timeout.
        self._holds: dict[str, float] = {}
        #: Settle on a background thread in batches (False: on the caller's thread).
        self.deferred = True
        #: Queued settles ride along in the next admit's transaction (one commit per call).
        self.piggyback = True
        self._pending: list[_Settlement] = []
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._asleep = False  # the settler waits with nothing to do (only a wake ends it)
        self._settler: threading.Thread | None = None
        self._closing = False
        atexit.register(_flush_at_exit, weakref.ref(self))
        self._driver = Driver(store)
        self._insert_window = insert_ignore(store, W)
        self._insert_alert = insert_ignore(store, AL)
        #: Busy windows are admitted from leases (room reserved ahead); see _budget_lease.
        self.leases = True
        self._desk = LeaseDesk(self._fast, self._lock_windows_in_order, self._driver)

    def _after_fork_in_child(self) -> None:
        """Fresh locks and no settler thread in a forked child; the parent's queued
        settlements are the parent's to make (see Engine._after_fork_in_child)."""
        self._lock = threading.Lock()
        self._db_lock = threading.Lock() if self.store.is_sqlite else None
        self._pending, self._pending_lock = [], threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._asleep = False
        self._settler = None
        self._holds = {}  # the parent's calls: the parent renews them
        self._desk.after_fork_in_child()

    # -- registry ---------------------------------------------------------------------
    def add(self, budget: Budget, *, replace: bool = False, shared: bool = True,
            by: str | None = None) -> Budget:
        """Register ``budget``: stored in the ledger (every engine on it enforces it within
        about a second), or with ``shared=False`` in this book only."""
        if not isinstance(budget, Budget):
            raise ConfigurationError(f"add_budget() takes a Budget, got {type(budget).__name__}")
        if shared:
            if budget.name in self._local:
                raise ConfigurationError(
                    f"budget {budget.name!r}, field 'name': a local budget (shared=False) has "
                    "this name in this engine; remove it first")
            self.registry.put(budget, replace=replace, by=by)
            self.refresh(force=True)
            return budget
        with self._lock:
            known = self._local.get(budget.name)
            if known is not None and known != budget and not replace:
                raise ConfigurationError(
                    f"budget {budget.name!r}, field 'name': a different budget has this name; "
                    "pass replace=True to redefine it")
            self._local = {**self._local, budget.name: budget}
            self._budgets = {**self._shared, **self._local}
        return budget

    def remove(self, name: str) -> None:
        """Stop enforcing a budget: this engine's local one of that name, else the ledger's
        (then every engine stops within about a second)."""
        with self._lock:
            if name in self._local:
                self._local = {k: v for k, v in self._local.items() if k != name}
                self._budgets = {**self._shared, **self._local}
                return
        if not self.registry.remove(name):
            self.refresh(force=True)
            self._get(name)  # unknown: the error names what is registered
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> bool:
        """Take the ledger's stored budgets if they changed (a read of the registry's
        version, at most once per ``POLL_INTERVAL`` unless ``force``). Returns whether
        this book has any budget."""
        now = time.monotonic()
        if not force and now < self._poll_at:
            return bool(self._budgets)
        self._poll_at = now + POLL_INTERVAL
        try:
            version = self.registry.version()
            if version != self._shared_version:
                version, shared = self.registry.read()
                with self._lock:
                    self._shared, self._shared_version = shared, version
                    self._budgets = {**shared, **self._local}
        except self._driver.errors:  # keep enforcing what we know; said once per outage
            if force:
                raise
            if not self._poll_failing:
                self._poll_failing = True
                logger.warning("budgetkit: could not read the ledger's budget definitions; "
                               "enforcing the ones read before", exc_info=True)
        else:
            self._poll_failing = False
        return bool(self._budgets)

    def is_shared(self, name: str) -> bool:
        """Whether the budget of that name here is the ledger's (not a local one)."""
        return name in self._shared and name not in self._local

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
        targets, units = self._targets_and_units(ticket, now)
        if not targets:
            return
        if self._next_reap is None or now >= self._next_reap:
            self._next_reap = now + dt.timedelta(seconds=REAP_INTERVAL)
            self.reap(now)
        elif units is not None and self._desk.any_active \
                and self._reserve_from_leases(ticket, targets, units, now, judge=True):
            return  # the common case of a busy app: every window has a lease with room
        solo = [(None, budget, key, start, _worst_case(budget.unit, ticket))
                for budget, key, start, window_id in targets if window_id is None]
        for _none, budget, key, start, amount in solo:
            if amount > budget.stop_amount:
                raise self._blocked(budget, key, start, None, amount, now)
        leasing = self._desk.any_active  # leases admit on the prompt's bound, uncounted
        worst = {unit: _worst_case(unit, ticket, bound=leasing) for unit in
                 {budget.unit for budget, _key, _start, window_id in targets
                  if window_id is not None}}
        plan: list[tuple[Any, ...]] = sorted(((window_id, budget, key, start,
                                                worst[budget.unit])
                       for budget, key, start, window_id in targets if window_id is not None),
                      key=lambda item: item[0])
        leased: list[tuple[tuple[Any, ...], Any]] = []
        if plan and leasing:
            plan, leased, short = self._desk.take(plan, now)
            if short:
                more, left = self._desk.top_up(short, now)
                leased += more
                plan = [*plan, *left]
                self._threshold_alerts([(lease, lease.seen_spent, lease.seen_reserved)
                                        for _item, lease in more])
            if plan:  # reserved one by one: with the counted prompt
                plan = sorted(((window_id, budget, key, start,
                                _worst_case(budget.unit, ticket))
                               for window_id, budget, key, start, _amount in plan),
                              key=lambda item: item[0])
        try:
            results = self._reserve_exact(ticket, plan, now)
        except BaseException:
            self._desk.give_back(leased)
            raise
        if plan:  # rows that expire unless renewed while the call runs
            self._holds[ticket.id] = time.monotonic()
            self._ensure_settler()
            if self.leases:
                self._desk.note_exact(plan, results)
        if self._asleep:  # holds to renew, leases to sync: the settler's timer runs again
            self._wake.set()
        if self._desk.refill_wanted:
            self._wake.set()
        plan = [*(item for item, _lease in leased), *plan, *solo]
        results = [*(lease.state() for _item, lease in leased), *results,
                   *((0, item[4]) for item in solo)]
        ticket.reservations = [Reservation(window_id, budget, key, start, amount,
                                           leased=index < len(leased))
                               for index, (window_id, budget, key, start, amount)
                               in enumerate(plan)]
        self._judge(ticket, plan, results)

    def reserve_in_memory(self, ticket: Any) -> bool:
        """:meth:`reserve` when it needs no database (the windows are known and their
        leases have room, every level normal): the asyncio path tries this on the event
        loop before sending the work to a thread. False: nothing was reserved."""
        if not self._budgets or not self._desk.any_active:
            return False
        now = self.clock()
        if self._next_reap is None or now >= self._next_reap:
            return False
        cached = self._cached_targets(ticket, now)
        if cached is None or cached[1] is None or not cached[0]:
            return False
        return self._reserve_from_leases(ticket, cached[0], cached[1], now, judge=False)

    def _reserve_from_leases(self, ticket: Any, targets: Sequence[tuple[Any, ...]],
                             units: tuple[str, ...], now: dt.datetime, *, judge: bool) -> bool:
        """Admit from the leases of all the ticket's windows, or reserve nothing. With
        ``judge`` False, a call that reaches a level (whose alert is stored) is not taken."""
        by_unit = {unit: _worst_case(unit, ticket, bound=True) for unit in units}
        amounts = [by_unit[budget.unit] for budget, *_rest in targets]
        leases = self._desk.take_all(targets, amounts, now)
        if leases is None:
            return False
        leased_plan = [(window_id, budget, key, start, amount)
                       for (budget, key, start, window_id), amount in zip(targets, amounts)]
        states = [lease.state() for lease in leases]
        if all(spent + reserved < budget.level_amounts[0]
               and (budget.downgrade_below is None or spent + reserved <= budget.keep_amount)
               for (budget, *_rest), (spent, reserved) in zip(targets, states)):
            ticket.decision = "allow"  # every window below its first level
        elif judge:
            self._judge(ticket, leased_plan, states)
        else:
            self._desk.give_back(list(zip(leased_plan, leases)))
            return False
        ticket.reservations = [Reservation(*item, leased=True) for item in leased_plan]
        if self._desk.refill_wanted:  # topped up ahead, off this thread
            self._wake.set()
        return True

    def _reserve_exact(self, ticket: Any, plan: list[tuple[Any, ...]], now: dt.datetime
                       ) -> list[tuple[int, int]]:
        """Reserve the ticket's worst case in each window of ``plan`` in one transaction
        (retried once after settling our queue and reaping expired reservations)."""
        results: list[tuple[int, int]] = []
        for attempt in (1, 2):
            if not plan:
                break
            try:
                results = self._reserve_all(ticket.id, plan, now)
                break
            except self._driver.errors:
                if attempt == 1:  # a deadlock victim or a dropped connection: once more
                    continue
                raise
            except _NoRoom as no_room:
                window_id, budget, key, start, amount = plan[no_room.index]
                # Our own finished calls may still hold reservations (queued settles), and
                # reservations of a dead process may be what fills the window.
                if attempt == 1:
                    self.flush()
                    self.reap(now, window_id=window_id)
                    if self._forget_missing_windows(plan):  # deleted behind our back
                        plan[:] = self._replan(ticket, plan, now)
                    continue
                raise self._blocked(budget, key, start, window_id, amount, now) from None
        return results

    def _replan(self, ticket: Any, plan: list[tuple[Any, ...]], now: dt.datetime
                ) -> list[tuple[Any, ...]]:
        """``plan`` again after window rows were deleted: their windows are made anew."""
        wanted = {(item[1].name, item[2]) for item in plan}
        return sorted(((window_id, budget, key, start, _worst_case(budget.unit, ticket))
                       for budget, key, start, window_id in self._targets(ticket, now)
                       if window_id is not None and (budget.name, key) in wanted),
                      key=lambda item: item[0])

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
                    # Finished calls settle in this admit's transaction: one commit for both.
                    with self._pending_lock:
                        taken, self._pending = self._pending, []
                    self._lock_windows(run, [*(item[0] for item in plan),
                                             *(reservation.window_id for done in taken
                                               for reservation in done.reservations)])
                    settled = self._apply_settlements(run, taken, locked=True)
                self._reserve_in(run, ticket_id, plan, at, until, results)
        except BaseException:
            if taken:  # rolled back with the reservation: queue them again
                with self._pending_lock:
                    self._pending[:0] = taken
            raise
        if settled:
            self._threshold_alerts(settled)
        return results

    def _lock_windows_in_order(self, run: Callable[..., list[Any]], ids: Sequence[int]) -> None:
        """PostgreSQL: lock these windows (even one) in id order; leases touch reservation
        rows before the window's own update."""
        if self._driver.dialect != "postgresql" or not ids:
            return
        names = ", ".join(f":l{index}" for index in range(len(ids)))
        run(f"SELECT id FROM budgetkit_budget_window WHERE id IN ({names}) "
            "ORDER BY id FOR UPDATE", {f"l{index}": wid for index, wid in enumerate(sorted(ids))})

    def _lock_windows(self, run: Callable[..., list[Any]], ids: Iterable[int | None]) -> None:
        """PostgreSQL: lock these windows in id order before touching reservation rows.

        Every budget transaction takes window rows in id order and only then reservation
        rows, so no two of them can wait on each other in a cycle. (SQLite locks the whole
        database per transaction and needs none of this.)
        """
        wanted = sorted({window_id for window_id in ids if window_id is not None})
        if self._driver.dialect != "postgresql" or len(wanted) < 2:
            return  # one row: nothing to order
        names = ", ".join(f":l{index}" for index in range(len(wanted)))
        run(f"SELECT id FROM budgetkit_budget_window WHERE id IN ({names}) "
            "ORDER BY id FOR UPDATE", {f"l{index}": wid for index, wid in enumerate(wanted)})

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

    def commit(self, ticket: Any, cost_nanos: int, tokens: int) -> None:
        """The call finished: actual spend replaces what the ticket reserved.

        Settling is queued for the settler thread, which batches many tickets into one
        transaction. Until it runs the ticket's reservation stays in place, which can only
        make admission stricter, never looser; an admit that finds no room settles the
        queue first and tries again.
        """
        reservations: list[Reservation] = ticket.reservations
        ticket.reservations = []
        leased = [item for item in reservations if item.leased]
        if leased:
            self._desk.settle(leased, cost_nanos, tokens)
            if self._asleep:  # spend to sync into the windows
                self._wake.set()
            if self._desk.sync_wanted:  # an alert threshold was crossed: the settler syncs
                self._wake.set()
            if len(leased) == len(reservations):
                return
            reservations = [item for item in reservations if not item.leased]
        held = bool(reservations)
        if held:
            self._holds.pop(ticket.id, None)
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
        self._ensure_settler()
        self._wake.set()

    @property
    def settles_in_memory(self) -> bool:
        """Whether :meth:`commit` only queues (the settler thread writes): no database."""
        return self.deferred and not self._closing

    def _ensure_settler(self) -> None:
        with self._pending_lock:
            if self._settler is None or not self._settler.is_alive():
                self._settler = threading.Thread(target=self._settle_forever, daemon=True,
                                                 name="budgetkit-settler")
                self._settler.start()

    def release(self, ticket: Any) -> None:
        """Give back what the ticket reserved (cancelled, failed or blocked elsewhere)."""
        if ticket.reservations:
            self.commit(ticket, 0, 0)

    def flush(self, *, return_leases: bool = True) -> int:
        """Settle every queued ticket now and move leased spend into the windows; with
        ``return_leases``, give the leases' unused room back too (else it stays leased:
        the next calls need no trip to lease again). Returns how many tickets were
        settled."""
        settled = self.settle_queued()
        self._sync_leases(shrink=return_leases)
        return settled

    def settle_queued(self) -> int:
        """Settle every queued ticket now; returns how many."""
        with self._flush_lock:
            with self._pending_lock:
                items, self._pending = self._pending, []
            if items:
                self._settle_batch(items)
        return len(items)

    def _sync_leases(self, *, shrink: bool = False) -> None:
        try:
            synced = self._desk.sync(self.clock(), shrink=shrink)
        except self._driver.errors:  # the leases stay; the next sync tries again
            logger.exception("budgetkit: could not sync budget leases")
            return
        self._threshold_alerts([(lease, lease.seen_spent, lease.seen_reserved)
                                for lease in synced])

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self.flush()
        with self._db_lock or contextlib.nullcontext():
            self._driver.close()

    def _settle_forever(self) -> None:
        while not self._closing:
            if self._has_work():
                self._wake.wait(LEASE_SYNC)
            else:  # nothing to settle, sync or renew: sleep until someone brings work
                self._asleep = True
                if not self._has_work():  # (work added just before we said so)
                    self._wake.wait()
                self._asleep = False
            self._wake.clear()
            if self.piggyback and not self._closing and self._pending:
                time.sleep(SETTLE_DELAY)  # the next admit will most likely take them
            try:
                with self._flush_lock:
                    with self._pending_lock:
                        items, self._pending = self._pending, []
                    if items:
                        self._settle_batch(items)
                if self._desk.refill_wanted:
                    refilled = self._desk.refill(self.clock())
                    self._threshold_alerts([(lease, lease.seen_spent, lease.seen_reserved)
                                            for lease in refilled])
                if self._desk.sync_wanted \
                        or time.monotonic() - self._desk.last_sync >= LEASE_SYNC:
                    self._sync_leases()
                if self._holds:
                    self.renew_holds()
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

    def _has_work(self) -> bool:
        desk = self._desk
        return bool(self._pending or self._holds or desk.refill_wanted or desk.sync_wanted
                    or desk.holding)

    def _settle_rows(self, items: Sequence[_Settlement]
                     ) -> list[tuple[Reservation, int, int]]:
        with self._fast() as run:
            return self._apply_settlements(run, items)

    def _apply_settlements(self, run: Callable[..., list[Any]], items: Sequence[_Settlement],
                           *, locked: bool = False) -> list[tuple[Reservation, int, int]]:
        """Settle ``items`` inside the caller's transaction; returns the windows' new state.

        Windows first (spent += actual, reserved -= what was held), then the reservation
        rows are deleted, the order every budget transaction keeps. A row the reaper
        deleted first was already given back, so that part is added back.
        """
        # window id -> [actual, held, one of its reservations]
        totals: dict[int, list[Any]] = {}
        for item in items:
            for reservation in item.reservations:
                if reservation.window_id is None:  # a lone call's run: nothing stored
                    continue
                actual = item.cost_nanos if reservation.budget.unit == "usd" else item.tokens
                total = totals.setdefault(reservation.window_id, [0, 0, reservation])
                total[0] += actual
                total[1] += reservation.amount if item.held else 0
        ids = sorted(window_id for window_id, (actual, held, _r) in totals.items()
                     if actual or held)
        state: dict[int, tuple[int, int]] = {}
        if len(ids) == 1:
            actual, held, _r = totals[ids[0]]
            rows = run(_SETTLE_SQL, {"wid": ids[0], "actual": actual, "held": held})
            state = {ids[0]: (int(rows[0][0]), int(rows[0][1]))} if rows else {}
        elif ids:
            if not locked:
                self._lock_windows(run, ids)
            params: dict[str, Any] = {}
            for index, window_id in enumerate(ids):
                params.update({f"w{index}": window_id, f"s{index}": totals[window_id][0],
                               f"h{index}": totals[window_id][1]})
            state = {int(row[0]): (int(row[1]), int(row[2]))
                     for row in run(_settle_many_sql(len(ids)), params)}
        held_ids = [item.ticket_id for item in items if item.held]
        deleted: set[tuple[str, int]] = set()
        for start in range(0, len(held_ids), 500):
            chunk = held_ids[start:start + 500]
            names = ", ".join(f":t{index}" for index in range(len(chunk)))
            rows = run(_UNHOLD_MANY_SQL.format(tickets=names),
                       {f"t{index}": ticket_id for index, ticket_id in enumerate(chunk)})
            deleted.update((str(t), int(w)) for t, w, _amount in rows)
        for item in items:
            if not item.held:
                continue
            for reservation in item.reservations:
                if reservation.window_id is not None and \
                        (item.ticket_id, reservation.window_id) not in deleted:
                    # the reaper gave it back already (the call outlived the timeout)
                    run(_UNRESERVE_SQL, {"wid": reservation.window_id,
                                         "amount": reservation.amount})
        return [(totals[window_id][2], *state[window_id]) for window_id in ids
                if window_id in state and totals[window_id][0]]

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
                if (self._desk.grow(item, grow, now) if item.leased
                        else self._grow(ticket.id, item, grow, now)):
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
        except self._driver.errors:  # never stop a user's stream because the database hiccuped
            logger.exception("budgetkit: could not grow a streaming reservation")
            return True
        item.amount += grow
        return True

    # -- expiry -----------------------------------------------------------------------
    def renew_holds(self, *, older_than: float | None = None) -> int:
        """The heartbeat: push back the expiry of the reservation rows of calls still
        running that were (re)set more than ``older_than`` wall seconds ago (default: a
        third of the timeout). Returns how many rows were renewed."""
        interval = self.reservation_timeout / 3 if older_than is None else older_than
        started = time.monotonic()
        due = [ticket_id for ticket_id, since in list(self._holds.items())
               if started - since >= interval]
        if not due:
            return 0
        until = self._driver.time(self.clock()
                                  + dt.timedelta(seconds=self.reservation_timeout))
        renewed = 0
        for begin in range(0, len(due), 500):
            chunk = sorted(due[begin:begin + 500])  # one order: no two renewals wait in a cycle
            names = ", ".join(f":t{index}" for index in range(len(chunk)))
            params: dict[str, Any] = {f"t{index}": ticket_id
                                      for index, ticket_id in enumerate(chunk)}
            params["until"] = until
            try:
                with self._fast() as run:
                    rows = run(_RENEW_SQL.format(tickets=names), params)
            except self._driver.errors:  # tried again at the next beat, well before expiry
                logger.exception("budgetkit: could not renew %d budget reservation(s)",
                                 len(chunk))
                continue
            renewed += len(rows)
            for ticket_id in chunk:
                if ticket_id in self._holds:  # (settled meanwhile: gone)
                    self._holds[ticket_id] = started
        return renewed

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
                if self._driver.dialect == "postgresql":  # window before reservation rows,
                    conn.execute(select(W.c.id).where(W.c.id == wid)  # as everywhere
                                 .with_for_update())
                gone = conn.execute(delete(R).where(R.c.ticket_id == ticket_id,
                                                    R.c.window_id == wid)).rowcount
                if gone:  # we won the delete, so we give the amount back
                    conn.execute(update(W).where(W.c.id == wid)
                                 .values(reserved=W.c.reserved - amount))
                    reclaimed += int(amount)
        if reclaimed:
            logger.warning("budgetkit: reclaimed %d expired budget reservation(s)", len(expired))
        return reclaimed

_RENEW_SQL = """
UPDATE budgetkit_budget_reservation SET expires_at = :until WHERE ticket_id IN ({tickets})
RETURNING ticket_id"""


def _flush_at_exit(book_ref: weakref.ref[BudgetBook]) -> None:
    book = book_ref()
    if book is not None and book._pending:
        try:
            book.flush()
        except Exception:  # at exit: the reservations expire anyway
            logger.exception("budgetkit: settling budgets at exit failed")


def _worst_case(unit: str, ticket: Any, *, bound: bool = False) -> int:
    """What the call may cost in a budget unit ("usd": nano-dollars, or tokens). ``bound``:
    with the prompt's upper bound when it has not been counted (enough for a roomy lease)."""
    if bound and ticket.input_bound is not None and not ticket.input_counted:
        if unit == "usd":
            return int(ticket.price.cost_nanos(ticket.input_bound, ticket.max_output_tokens))
        return int(ticket.input_bound + ticket.max_output_tokens)
    if unit == "usd":
        return int(ticket.worst_case_nanos)
    return int(ticket.input_tokens + ticket.max_output_tokens)


