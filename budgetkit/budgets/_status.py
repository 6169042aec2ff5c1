"""Reading the budget book: status per window, approvals, stored alerts, headroom.

:class:`BudgetReader` is a mixin of :class:`~budgetkit.budgets._book.BudgetBook`; it only
reads, except :meth:`approve`, which stores an approval.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import insert, or_, select

from budgetkit.errors import ConfigurationError

from ._alerts import Alert
from ._budget import UNLIMITED, Budget
from ._sql import _APPROVED, AL, A, W

__all__ = ["BudgetReader", "BudgetStatus", "Approval", "attribution_ticket"]

logger = logging.getLogger("budgetkit")


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


class BudgetReader:
    """Status, approvals, alerts and headroom of a :class:`BudgetBook` (a mixin)."""

    # provided by BudgetBook (and its Windows mixin)
    _budgets: dict[str, Budget]
    _desk: Any
    clock: Any
    store: Any
    flush: Any
    settle_queued: Any
    reap: Callable[[dt.datetime], int]
    _get: Callable[[str], Budget]
    _transaction: Callable[[], AbstractContextManager[Any]]
    _window_bounds: Callable[[Budget, dt.datetime], tuple[dt.datetime, dt.datetime | None]]
    _window_id: Callable[[Budget, str, dt.datetime, dt.datetime | None, dt.datetime], int | None]
    _targets: Callable[..., list[tuple[Budget, str, dt.datetime, int | None]]]

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
            if (isinstance(extra, bool) or not isinstance(extra, (int, float))
                    or not 0 < extra < math.inf):  # written so that NaN fails too
                raise ConfigurationError(f"budget {name!r}, field 'extra': must be a positive "
                                         f"finite amount, got {extra!r}")
            amount = budget.amount_of(extra)
        else:
            amount = UNLIMITED
        if isinstance(expires, dt.timedelta):
            expires_at: dt.datetime | None = now + expires
        elif isinstance(expires, (int, float)) and not isinstance(expires, bool):
            if not 0 < expires < math.inf:
                raise ConfigurationError(f"budget {name!r}, field 'expires': seconds must be "
                                         f"a positive finite number, got {expires!r}")
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
        # Asked before routed calls: the leases stay (giving them back would cost a trip
        # now and another to lease again), their unused room is not counted as used.
        self.settle_queued()
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
            for window_id, room in self._desk.unused_room(ids).items():
                used[window_id] = used.get(window_id, 0) - room
        fractions = []
        for budget, _key, _start, window_id in targets:
            limit = budget.limit_amount
            fractions.append(max(0.0, (limit - used.get(window_id or -1, 0)) / limit))
        return min(fractions)


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
