"""Leases: a process reserves room in a busy budget window ahead, then admits calls locally.

Reserving every call in the database costs one transaction per call (~150-300 µs on SQLite,
1-2 ms on PostgreSQL). When a window is busy in this process (``LEASE_AFTER`` admits
within a second), the book takes a *lease* instead: one reservation, in the same window
row and under the same conditional update as a call's, for the room of about
``LEASE_CALLS`` calls like the one asking. Calls are then admitted against the lease in
memory; their actual spend is moved into the window when the lease is next topped up,
synced (every ``LEASE_SYNC`` seconds) or flushed. A lease half used is topped up by the
book's settler thread, so a caller waits for the database (on SQLite, possibly behind the
ledger writer's batch) only when a lease runs dry faster than that.

What keeps the promises of the budget book:

- A lease is a reservation like any other: the window's ``spent + reserved`` never passes
  its stop, so leased calls cannot overspend (settled spend ≤ the worst cases reserved).
- Room is taken only while the window has plenty: a lease takes at most an eighth of the
  room left above a floor of a tenth of the stop, so near the limit every process falls
  back to reserving each call exactly (and gives its unused room back first). A budget is
  therefore never left more than one call's worst case unused for lack of a lease's room.
- A lease row expires like a call's reservation (after ``LEASE_TIMEOUT`` seconds without a
  sync): the room of a process that died comes back; a live process refreshes it.
- An idle lease (no admit since the last sync) is given back at the next sync; ``flush``
  and ``close`` give every unused room back, so status read after them is exact.

The window's ``reserved`` includes the unused room of leases (room promised to a process
that has not used it yet). Alerts on thresholds fire when spend reaches the window (at the
next sync, within about a second).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._budget import Budget

__all__ = ["Lease", "LeaseDesk", "LEASE_AFTER", "LEASE_CALLS", "LEASE_SYNC", "LEASE_TIMEOUT"]

#: Admits of one window within a (wall) second that make it worth a lease.
LEASE_AFTER = 8
#: A lease is topped up with room for about this many calls like the one asking.
LEASE_CALLS = 1000
#: Seconds (wall) between syncs: spend moved into the windows, idle leases given back.
LEASE_SYNC = 1.0
#: Seconds (engine clock) after which the lease of a process that stopped syncing expires.
LEASE_TIMEOUT = 60.0

_LEASE_SQL = """
UPDATE budgetkit_budget_window SET spent = spent + :push, reserved = reserved + :delta
WHERE id = :wid AND (:push + :delta <= 0 OR spent + :push + reserved + :delta <= :cap + COALESCE(
    (SELECT SUM(extra) FROM budgetkit_budget_approval
     WHERE window_id = :wid AND (expires_at IS NULL OR expires_at > :now)), 0))
RETURNING spent, reserved"""
_LEASE_FORCE_SQL = """
UPDATE budgetkit_budget_window SET spent = spent + :push, reserved = reserved + :delta
WHERE id = :wid RETURNING spent, reserved"""
_LEASE_ROWS_SQL = """
DELETE FROM budgetkit_budget_reservation WHERE ticket_id = :lease AND window_id IN ({ids})
RETURNING window_id, amount"""
_LEASE_HOLD_SQL = """
INSERT INTO budgetkit_budget_reservation (ticket_id, window_id, amount, expires_at)
VALUES (:lease, :wid, :amount, :expires)"""


@dataclass(eq=False)
class Lease:
    """This process's room in one budget window (amounts in the budget's unit)."""

    window_id: int
    budget: Budget
    scope_key: str
    window_start: dt.datetime
    held: int = 0  # reserved in the window under this process's lease
    inflight: int = 0  # worst cases of calls admitted from it and still running
    spent: int = 0  # what finished calls really cost, not yet moved into the window
    seen_spent: int = 0  # the window's state at the last trip to the database
    seen_reserved: int = 0
    expires: dt.datetime | None = None  # engine clock
    active: bool = False  # admitting from the lease (else: every call reserved exactly)
    tripping: bool = False  # a trip is under way: admits wait for it
    admits: int = 0  # exact admits in the current second (to decide on a lease)
    second: float = 0.0
    used_since_sync: bool = False
    hint: int = 0  # the last call's worst case: leases are sized in such calls
    refill: bool = False  # running low: the settler thread tops it up ahead of need
    topped: int = 0  # the room right after the last trip (refilled when half is used)
    alert_from: int | None = None  # spend at which the window's next alert threshold lies

    def next_threshold(self) -> int | None:
        """The smallest alert threshold above the window's known spend (None: none left)."""
        budget, spent = self.budget, self.seen_spent
        return next((amount for amount in (math.ceil(fraction * budget.limit_amount)
                                           for fraction in budget.alert_at)
                     if amount > spent), None)

    def _took(self, amount: int) -> bool:
        """Count a call admitted from the lease; True when it should be refilled now
        (half of its room since the last trip used), so callers rarely wait for a trip."""
        self.inflight += amount
        self.used_since_sync = True
        self.hint = amount
        if not self.refill and self.room < self.topped // 2:
            self.refill = True
            return True
        return False

    @property
    def room(self) -> int:
        return self.held - self.inflight - self.spent

    def has_room(self, amount: int, now: dt.datetime) -> bool:
        """Whether a call of this worst case can be admitted from the lease now."""
        return (not self.tripping and self.room >= amount and self.expires is not None
                and now < self.expires)

    def state(self) -> tuple[int, int]:
        """The window's (spent, reserved) as this process best knows it now."""
        return (self.seen_spent + self.spent,
                max(0, self.seen_reserved - self.held + self.inflight))


class LeaseDesk:
    """The leases of one budget book. ``run_transaction`` is the book's fast transaction
    (yields ``run(sql, params)``), ``lock_windows`` its PostgreSQL row-order lock."""

    def __init__(self, transaction: Callable[[], Any],
                 lock_windows: Callable[[Callable[..., list[Any]], Sequence[int]], None],
                 driver: Any) -> None:
        self._transaction = transaction
        self._lock_windows = lock_windows
        self._driver = driver
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._trip_lock = threading.Lock()
        self._pid = os.getpid()
        self.lease_id = f"lease:{uuid.uuid4().hex[:26]}"  # ticket ids are 32 chars
        self.any_active = False
        self.refill_wanted = False  # a lease ran low: the book wakes its settler
        self.sync_wanted = False  # leased spend crossed an alert threshold: sync soon
        self.last_sync = time.monotonic()
        #: admission lanes holding credit from these leases (see _budget_lane)
        self.lanes_with_credit: dict[Any, None] = {}

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # either may have been held at the fork
        self._trip_lock = threading.Lock()
        self._forked()

    def _forked(self) -> None:
        """A forked child holds none of its parent's leases."""
        with self._lock:
            for lane in self.lanes_with_credit:
                lane.forget_credit()
            self.lanes_with_credit = {}
            self._leases, self._pid = {}, os.getpid()
            self.lease_id = f"lease:{uuid.uuid4().hex[:26]}"  # ticket ids are 32 chars
            self.any_active = False

    # -- admitting ----------------------------------------------------------------------
    def take(self, plan: Sequence[tuple[Any, ...]], now: dt.datetime
             ) -> tuple[list[tuple[Any, ...]], list[tuple[tuple[Any, ...], Lease]],
                        list[tuple[tuple[Any, ...], Lease]]]:
        """Split ``plan`` (window id, budget, key, start, amount) into what is admitted
        from leases now, what needs a lease topped up, and what is reserved exactly."""
        if self._pid != os.getpid():
            self._forked()
        exact: list[tuple[Any, ...]] = []
        taken: list[tuple[tuple[Any, ...], Lease]] = []
        short: list[tuple[tuple[Any, ...], Lease]] = []
        with self._lock:
            for item in plan:
                lease = self._leases.get(item[0])
                if lease is None or not lease.active:
                    exact.append(item)
                elif lease.has_room(item[4], now):
                    if lease._took(item[4]):
                        self.refill_wanted = True
                    taken.append((item, lease))
                else:
                    short.append((item, lease))
        return exact, taken, short

    def take_all(self, targets: Sequence[tuple[Any, ...]], amounts: Sequence[int],
                 now: dt.datetime, limits: Sequence[int] | None = None,
                 hint: Sequence[int] | None = None) -> list[Lease] | None:
        """Admit a call from the leases of all its windows (budget, key, start, window
        id), ``amounts[i]`` from the i-th, or from none: None when any of them lacks a
        lease with room, or (with ``limits``) would hold more than ``limits[i]`` after.
        ``hint``: one call's amounts, when ``amounts`` are for several (leases are sized
        in calls)."""
        if self._pid != os.getpid():
            return None
        leases_by_window = self._leases
        with self._lock:
            # Runs before every leased call, on the caller's thread: has_room, state and
            # _took written out, as one pass over plain attributes.
            leases = []
            for index, target in enumerate(targets):
                lease = leases_by_window.get(target[3])
                if lease is None or not lease.active or lease.tripping \
                        or lease.expires is None or now >= lease.expires:
                    return None
                amount = amounts[index]
                if lease.held - lease.inflight - lease.spent < amount:
                    return None
                if limits is not None and (
                        lease.seen_spent + lease.spent
                        + max(0, lease.seen_reserved - lease.held + lease.inflight)
                        + amount > limits[index]):
                    return None
                leases.append(lease)
            for index, lease in enumerate(leases):
                if lease._took(amounts[index]):
                    self.refill_wanted = True
                if hint is not None:
                    lease.hint = hint[index]
        return leases

    def top_up(self, short: Sequence[tuple[tuple[Any, ...], Lease]], now: dt.datetime
               ) -> tuple[list[tuple[tuple[Any, ...], Lease]], list[tuple[Any, ...]]]:
        """Grow the leases ``short`` needs; returns (admitted from leases, left for exact)."""
        with self._trip_lock:
            taken: list[tuple[tuple[Any, ...], Lease]] = []
            pending: list[tuple[tuple[Any, ...], Lease]] = []
            exact: list[tuple[Any, ...]] = []
            with self._lock:  # another thread's trip may have made the room meanwhile
                for item, lease in short:
                    if not lease.active:
                        exact.append(item)
                    elif lease.has_room(item[4], now):
                        if lease._took(item[4]):
                            self.refill_wanted = True
                        taken.append((item, lease))
                    else:
                        pending.append((item, lease))
            if not pending:
                return taken, exact
            granted = self._trip([(lease, item[4]) for item, lease in pending], now)
        for (item, lease), ok in zip(pending, granted):
            if ok:
                taken.append((item, lease))
            else:
                exact.append(item)
        return taken, exact

    def give_back(self, taken: Sequence[tuple[tuple[Any, ...], Lease]]) -> None:
        """Undo ``take`` / ``top_up`` for a call that another window blocked."""
        with self._lock:
            for item, lease in taken:
                lease.inflight -= item[4]

    def settle(self, lease_reservations: Sequence[Any], cost_nanos: int, tokens: int) -> None:
        """A call admitted from leases ended: its worst case out, its actual spend in."""
        with self._lock:
            for reservation in lease_reservations:
                lease = self._leases.get(reservation.window_id)
                if lease is None:  # cannot happen while the call is in flight
                    continue
                lease.inflight -= reservation.amount
                lease.spent += cost_nanos if reservation.budget.unit == "usd" else tokens
                if lease.alert_from is not None \
                        and lease.seen_spent + lease.spent >= lease.alert_from:
                    # spend has crossed an alert threshold: move it into the window now
                    # (the sync fires the alert) rather than at the next periodic sync
                    lease.alert_from = None
                    self.sync_wanted = True
    def grow(self, reservation: Any, grow: int, now: dt.datetime) -> bool:
        """A streaming call outgrew its worst case: more room for it, if there is any."""
        lease = self._leases.get(reservation.window_id)
        if lease is None:
            return False
        with self._lock:
            if lease.active and not lease.tripping and lease.room >= grow:
                lease.inflight += grow
                reservation.amount += grow
                return True
        with self._trip_lock:
            (ok,) = self._trip([(lease, grow)], now)
        if ok:
            reservation.amount += grow
        return ok

    def note_exact(self, plan: Sequence[tuple[Any, ...]],
                   results: Sequence[tuple[int, int]]) -> bool:
        """Count exact admits per window; a busy window with room to spare gets a lease
        (topped up at its next admit). Returns whether a lease was switched on."""
        switched = False
        clock = time.monotonic()
        with self._lock:
            for item, (spent, reserved) in zip(plan, results):
                window_id, budget = item[0], item[1]
                lease = self._leases.get(window_id)
                if lease is None:
                    if len(self._leases) > 10_000:  # bounded: drop leases holding nothing
                        self._leases = {k: v for k, v in self._leases.items()
                                        if v.held or v.inflight or v.spent}
                    lease = self._leases[window_id] = Lease(window_id, budget, item[2],
                                                            item[3])
                if lease.active:
                    continue
                if clock - lease.second >= 1.0:
                    lease.second, lease.admits = clock, 0
                lease.admits += 1
                lease.seen_spent, lease.seen_reserved = spent, reserved
                if lease.admits >= LEASE_AFTER and _spare(budget, spent, reserved) > 0:
                    lease.active = switched = True
                    self.any_active = True
        return switched

    # -- the database trips -------------------------------------------------------------
    def _trip(self, wants: Sequence[tuple[Lease, int]], now: dt.datetime,
              *, shrink: bool = False, refill: bool = False) -> list[bool]:
        """Move settled spend into the windows and set each lease's room: ``need`` more
        plus about LEASE_CALLS calls' worth (``need`` 0: keep or, with ``shrink``, give
        back the unused room). Caller holds the trip lock. Returns, per lease, whether
        ``need`` was granted (and counted in flight)."""
        with self._lock:
            # Lanes' unused credit first: what is in flight is then what calls hold.
            for lane in self.lanes_with_credit:
                lane.return_credit()
            self.lanes_with_credit = {}
            plans = []
            for lease, need in wants:
                # Admits wait for a trip that may shrink a lease or cover one call; a
                # refill only grows it, so calls keep taking the room it has (held is
                # replaced after the trip by at least what they can have taken).
                lease.tripping = not refill
                push, inflight = lease.spent, lease.inflight
                if need:
                    spare = _spare(lease.budget, lease.seen_spent + push,
                                   lease.seen_reserved - lease.held + inflight)
                    extra = min(need * LEASE_CALLS, spare // 8) if spare > need else 0
                    target = inflight + need + extra if extra else None
                    minimal = inflight + need
                elif refill:  # room for about LEASE_CALLS calls again, if there is room
                    keep = max(0, lease.held - inflight - push)
                    spare = _spare(lease.budget, lease.seen_spent + push,
                                   lease.seen_reserved - lease.held + inflight)
                    extra = min(lease.hint * LEASE_CALLS, max(0, spare) // 8)
                    target = inflight + extra if extra > keep else None
                    minimal = inflight + keep
                else:
                    keep = 0 if shrink or not lease.used_since_sync or not lease.active \
                        else max(0, lease.held - lease.inflight - push)
                    target, minimal = inflight + keep, inflight + keep
                plans.append((lease, need, push, inflight, target, minimal))
        results: dict[int, tuple[int, int, int, bool]] = {}  # wid -> spent, reserved, held, ok
        expires = now + dt.timedelta(seconds=LEASE_TIMEOUT)
        at, until = self._driver.time(now), self._driver.time(expires)
        try:
            with self._transaction() as run:
                ids = sorted({lease.window_id for lease, *_rest in plans})
                self._lock_windows(run, ids)
                names = ", ".join(f":w{index}" for index in range(len(ids)))
                params: dict[str, Any] = {f"w{index}": wid for index, wid in enumerate(ids)}
                params["lease"] = self.lease_id
                db_held = {int(wid): int(amount)
                           for wid, amount in run(_LEASE_ROWS_SQL.format(ids=names), params)}
                holds = []
                for lease, need, push, inflight, target, minimal in plans:
                    held_now = db_held.get(lease.window_id, 0)
                    row, held, ok = None, minimal, bool(need)
                    for wanted in ([target] if target is not None else []) + [minimal]:
                        row = run(_LEASE_SQL, {"wid": lease.window_id, "push": push,
                                               "delta": wanted - held_now,
                                               "cap": lease.budget.stop_amount, "now": at})
                        if row:
                            held = wanted
                            break
                    if not row:  # no room: cover what is in flight, admit nothing more
                        held, ok = inflight, False
                        row = run(_LEASE_FORCE_SQL, {"wid": lease.window_id, "push": push,
                                                     "delta": held - held_now})
                    if held > 0:
                        holds.append({"lease": self.lease_id, "wid": lease.window_id,
                                      "amount": held, "expires": until})
                    results[lease.window_id] = (int(row[0][0]), int(row[0][1]), held, ok)
                if holds:
                    run(_LEASE_HOLD_SQL, holds)
        except BaseException:
            with self._lock:
                for lease, *_rest in plans:
                    lease.tripping = False
            raise
        granted = []
        with self._lock:  # the new state and the end of the trip at once: no admit between
            for lease, need, push, _inflight, target, _minimal in plans:
                lease.tripping = False
                spent, reserved, held, ok = results[lease.window_id]
                lease.spent -= push
                lease.held = held
                lease.seen_spent, lease.seen_reserved = spent, reserved
                lease.expires = now + dt.timedelta(seconds=LEASE_TIMEOUT / 2)  # sync margin
                if need and ok:
                    lease.inflight += need
                    lease.used_since_sync = True
                if need and (not ok or held != target):
                    # near the limit (no room beyond this call): every call reserved exactly
                    lease.active = False
                    lease.admits = 0
                lease.topped = max(0, lease.room)  # refilled once half of it is used
                lease.alert_from = lease.next_threshold()
                if refill:
                    lease.refill = False
                elif not need:
                    if shrink:
                        lease.active = False
                    lease.used_since_sync = False
                if need:
                    lease.refill = False  # topped up just now
                granted.append(bool(need and ok))
            self.any_active = any(item.active for item in self._leases.values())
        return granted

    def refill(self, now: dt.datetime) -> list[Lease]:
        """Top up the leases running low (on the settler thread, ahead of need)."""
        self.refill_wanted = False
        with self._trip_lock:
            with self._lock:
                due = [lease for lease in self._leases.values()
                       if lease.refill and lease.active and not lease.tripping]
            if not due:
                return []
            self._trip([(lease, 0) for lease in due], now, refill=True)
        return due

    def sync(self, now: dt.datetime, *, shrink: bool = False) -> list[Lease]:
        """Move every lease's settled spend into its window; give idle leases' room back
        (every lease's with ``shrink``). Returns the leases synced (for alerts)."""
        if self._pid != os.getpid():
            self._forked()
        self.sync_wanted = False
        self.last_sync = time.monotonic()
        with self._trip_lock:
            with self._lock:
                due = [lease for lease in self._leases.values()
                       if lease.spent or (lease.held > lease.inflight
                                          and (shrink or not lease.used_since_sync
                                               or not lease.active))
                       or (lease.held and lease.expires is not None
                           and now >= lease.expires)]
            if not due:
                return []
            self._trip([(lease, 0) for lease in due], now, shrink=shrink)
        with self._lock:  # forget leases that hold nothing and are no longer busy
            for lease in due:
                if not (lease.held or lease.inflight or lease.spent or lease.active):
                    self._leases.pop(lease.window_id, None)
        return due

    def unused_room(self, window_ids: Sequence[int]) -> dict[int, int]:
        """The room this process holds in these windows and has not used (the window's
        ``reserved`` counts it)."""
        with self._lock:
            return {window_id: lease.room for window_id in window_ids
                    if (lease := self._leases.get(window_id)) is not None and lease.held}

    @property
    def holding(self) -> bool:
        """Whether any lease holds room or unsynced spend (the settler keeps syncing)."""
        return any(lease.held or lease.spent for lease in self._leases.values())


def _spare(budget: Budget, spent: int, reserved: int) -> int:
    """Room above the lease floor (a tenth of the stop): what leases may take from."""
    stop = budget.stop_amount
    return stop - stop // 10 - spent - reserved
