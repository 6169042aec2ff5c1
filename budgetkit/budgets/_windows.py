"""Which budget windows a call counts in: each budget's current window per scope key, made
on demand, remembered per attribution. A mixin of
:class:`~budgetkit.budgets._book.BudgetBook` (it uses the book's store, budgets and
transactions)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from ._budget import Budget, window_bounds
from ._sql import W, ledger_spend

if TYPE_CHECKING:
    from ._lane import AdmissionLane

__all__ = ["Windows"]


class Windows:
    """Window lookup of a budget book (see the module docs)."""

    store: Any
    _budgets: dict[str, Budget]
    _transaction: Any  # the book's context manager of one database transaction
    _insert_window: Any
    _window_ids: dict[tuple[str, str, str, str, dt.datetime], int]
    _bounds: dict[tuple[str, str], tuple[dt.datetime, dt.datetime | None]]
    _targets_of: dict[str, Budget] | None
    _target_cache: dict[tuple[Any, ...], tuple[Any, ...]]
    _run_scoped: bool

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
        window_id = int(window_id)  # an integer already; the query's result is typed Any
        self._window_ids[cache_key] = window_id
        return window_id

    def _targets(self, ticket: Any, now: dt.datetime, *, create: bool = True
                 ) -> list[tuple[Budget, str, dt.datetime, int | None]]:
        """The windows a call counts in: (budget, scope key, window start, window id)."""
        if not create:
            return self._find_targets(ticket, now, create=False)[0]
        return self._targets_and_units(ticket, now)[0]

    def _targets_and_units(self, ticket: Any, now: dt.datetime
                           ) -> tuple[list[tuple[Budget, str, dt.datetime, int | None]],
                                      tuple[str, ...] | None]:
        """:meth:`_targets` and the units of their budgets (None when a lone run's
        window, kept in memory, is among them)."""
        # Calls of one user / project / model mostly meet the same windows: remembered
        # per attribution until the first of those windows ends or the budgets change.
        budgets = self._budgets
        if self._targets_of is not budgets:
            self._targets_of, self._target_cache = budgets, {}
            self._run_scoped = any(budget.period == "run" or budget.scope == "run"
                                   for budget in budgets.values())
        signature = self._signature(ticket)
        cached = self._target_cache.get(signature)
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2], cached[3]
        targets, start, end = self._find_targets(ticket, now, create=True)
        if len(self._target_cache) > 10_000:
            self._target_cache.clear()
        # the units of the windows, or None when a lone run's window is among them
        units = (None if any(window_id is None for *_rest, window_id in targets)
                 else tuple({budget.unit for budget, *_rest in targets}))
        self._target_cache[signature] = (start, end, targets, units)
        return targets, units

    def _signature(self, ticket: Any) -> tuple[Any, ...]:
        """What decides a call's windows (the run only when a budget is per run)."""
        price = getattr(ticket, "price", None)
        return (ticket.provider, ticket.user_id, ticket.project, ticket.model,
                price.name if price is not None else None, ticket.operation_type,
                ticket.tags, (ticket.root_run_id or ticket.run_id or ticket.id)
                if self._run_scoped else None)

    def _cached_targets(self, ticket: Any, now: dt.datetime) -> tuple[Any, Any] | None:
        """:meth:`_targets_and_units` if remembered (no database), else None."""
        if self._targets_of is not self._budgets:
            return None
        cached = self._target_cache.get(self._signature(ticket))
        if cached is None or not cached[0] <= now < cached[1]:
            return None
        return cached[2], cached[3]

    def lane(self, ticket: Any, default_output: int, wall_clock: bool = False
             ) -> AdmissionLane | None:
        """An admission lane for calls like ``ticket`` (see ``_budget_lane``), or None."""
        from ._lane import AdmissionLane

        budgets = self._budgets
        if not budgets or self._targets_of is not budgets or self._run_scoped:
            return None
        cached = self._target_cache.get(self._signature(ticket))
        if cached is None or cached[3] is None:  # not looked up, or a lone run's window
            return None
        start, end, targets, _units = cached
        return AdmissionLane(self, budgets, (start, end), targets, ticket.price,
                             default_output, wall_clock)

    def _find_targets(self, ticket: Any, now: dt.datetime, *, create: bool
                      ) -> tuple[list[tuple[Budget, str, dt.datetime, int | None]],
                                 dt.datetime, dt.datetime]:
        targets: list[tuple[Budget, str, dt.datetime, int | None]] = []
        valid_from, valid_until = dt.datetime.min, dt.datetime.max
        solo = not (getattr(ticket, "root_run_id", None) or getattr(ticket, "run_id", None))
        for budget in self._budgets.values():
            keys = budget.window_keys(ticket)
            if not keys:
                continue
            start, end = self._window_bounds(budget, now)
            valid_from = max(valid_from, start)
            valid_until = min(valid_until, end or dt.datetime.max)
            for key in keys:
                if solo and (budget.period == "run"
                             or (budget.scope == "run" and budget.match is None)):
                    # A call outside any run is a run of its own: nothing can share its
                    # window, so it is checked in memory (window id None), not stored.
                    targets.append((budget, key, start, None))
                    continue
                targets.append((budget, key, start,
                                self._window_id(budget, key, start, end, now, create=create)))
        return targets, valid_from, valid_until

    def _forget_missing_windows(self, plan: Sequence[tuple[Any, ...]]) -> bool:
        """Drop cached ids of windows whose rows are gone (someone cleared the table)."""
        ids = [item[0] for item in plan]
        with self.store.engine.connect() as conn:
            present = set(conn.execute(select(W.c.id).where(W.c.id.in_(ids))).scalars())
        missing = set(ids) - present
        if missing:
            self._window_ids = {k: v for k, v in self._window_ids.items() if v not in missing}
            self._targets_of = None  # forget remembered targets too
        return bool(missing)
