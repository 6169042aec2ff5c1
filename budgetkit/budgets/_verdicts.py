"""The budget book's verdicts: levels judged at admit, threshold alerts, and the error that
stops a call. A mixin of :class:`~budgetkit.budgets._book.BudgetBook` (it uses the book's
store, clock, transactions and alert sinks)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from budgetkit.errors import ApprovalRequired, BudgetExceeded

from ._alerts import Alert
from ._budget import Budget
from ._sql import _APPROVED, AL, W

__all__ = ["Verdicts"]

logger = logging.getLogger("budgetkit")

_RANK = {"allow": 0, "warn": 1, "review": 2, "downgrade": 3}


class Verdicts:
    """Levels, alerts and stops of a budget book (see the module docs)."""

    store: Any
    clock: Any
    sinks: list[Any]
    _fired: set[tuple[int, str]]
    _insert_alert: Any
    _transaction: Any  # the book's context manager of one database transaction

    def _judge(self, ticket: Any, plan: Sequence[tuple[Any, ...]],
               results: Sequence[tuple[int, int]]) -> None:
        """Levels and the downgrade hint from the windows' state after reserving."""
        decision = "allow"
        rank = _RANK
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

    def _threshold_alerts(self, updates: Sequence[tuple[Any, int, int]]) -> None:
        """Alerts for windows whose spend reached a threshold; ``updates`` are (a
        reservation or a lease: window id, budget, scope key, window start; spent, reserved)."""
        for item, spent, reserved in updates:
            budget = item.budget
            for threshold in budget.alert_at:
                if spent >= threshold * budget.limit_amount:
                    self._alert(item.window_id, budget, item.scope_key, item.window_start,
                                f"threshold:{threshold:g}", budget.level_of(spent), threshold,
                                spent, reserved)

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
