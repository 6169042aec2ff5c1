"""The engine's budget methods: register, configure, read and approve budgets.

They hand every call to the budget book (:class:`budgetkit.budgets.BudgetBook`), created on
the first ``add_budget``; the book is the service and usable alone. Apart from the call's
life in ``_engine`` so that module reads as the path of one call.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from budgetkit.errors import ConfigurationError
from budgetkit.pricing import token_count

if TYPE_CHECKING:
    from budgetkit.budgets import BudgetBook
    from budgetkit.ledger import Store, Ticket
    from budgetkit.pricing import PriceCatalog

__all__ = ["BudgetMethods"]

logger = logging.getLogger("budgetkit")


class BudgetMethods:
    """Mixed into :class:`~budgetkit.engine.Engine`; reads the engine's store and clock."""

    store: Store
    _budgets: BudgetBook | None
    _lock: threading.Lock
    _budget_poll_at: float = 0.0  # monotonic time of the next look at the ledger's budgets
    _budget_poll_failing: bool = False

    def now(self) -> dt.datetime:
        raise NotImplementedError

    @property
    def catalog(self) -> PriceCatalog:
        raise NotImplementedError

    @property
    def project(self) -> str | None:
        raise NotImplementedError

    # -- budgets (see _budget_book) -----------------------------------------------------
    def _budget_book(self) -> BudgetBook:
        if self._budgets is None:
            from budgetkit.budgets import BudgetBook

            with self._lock:
                if self._budgets is None:
                    book = BudgetBook(self.store, self.now)
                    book.refresh(force=True)  # the budgets stored in the ledger
                    self._budgets = book
        return self._budgets

    def _current_budgets(self) -> BudgetBook | None:
        """The budget book, after a look at the budgets stored in the ledger when the last
        look is a second old (a monotonic read per call otherwise): budgets another
        engine or the CLI registered are enforced here within about a second."""
        book = self._budgets
        if book is not None:
            book.refresh()
            return book
        if time.monotonic() < self._budget_poll_at:
            return None
        from budgetkit.budgets import POLL_INTERVAL, SharedBudgets

        self._budget_poll_at = time.monotonic() + POLL_INTERVAL
        try:
            if SharedBudgets(self.store).version() == 0:
                return None  # no budget was ever stored in this ledger
        except Exception as exc:  # the database: calls go on; said once per outage
            if not self._budget_poll_failing:
                self._budget_poll_failing = True
                logger.warning("budgetkit: could not read the ledger's budget definitions "
                               "(%s: %s)", type(exc).__name__, exc)
            return None
        self._budget_poll_failing = False
        return self._budget_book()

    def add_budget(self, budget: Any, *, replace: bool = False, shared: bool = True) -> Any:
        """Register a :class:`Budget`; from now on every call it applies to is checked.

        ``engine.add_budget(Budget(limit=1.00))`` is a global daily budget of $1.
        The budget is stored in the ledger, so every engine on the ledger (other processes
        too) enforces it within about a second; ``shared=False`` keeps it to this engine
        (where it shadows a stored budget of the same name). A different budget under an
        existing name needs ``replace=True``.
        """
        return self._budget_book().add(budget, replace=replace, shared=shared)

    def load_budgets(self, path: Any, *, replace: bool = False,
                     shared: bool = True) -> list[Any]:
        """Register every budget of a TOML or JSON file (all checked before any is added;
        ``shared`` as in :meth:`add_budget`)."""
        from budgetkit.budgets import load_budgets

        budgets = load_budgets(path)
        book = self._budget_book()
        book.refresh(force=True)
        for budget in budgets:
            known = {item.name: item for item in book.budgets()}.get(budget.name)
            if known is not None and known != budget and not replace:
                raise ConfigurationError(f"{path}: budget {budget.name!r}, field 'name': a "
                                         "different budget has this name; pass replace=True")
        return [book.add(budget, replace=replace, shared=shared) for budget in budgets]

    def remove_budget(self, name: str) -> None:
        """Stop enforcing a budget: this engine's local one of that name, else the one
        stored in the ledger, for every engine (its stored windows stay for reports)."""
        self._budget_book().remove(name)

    def budgets(self) -> list[Any]:
        """The budgets this engine enforces (the ledger's and its local ones)."""
        book = self._current_budgets()
        return [] if book is None else book.budgets()

    def configure_budgets(self, *, reservation_timeout: float | None = None,
                          alert_sinks: Sequence[Callable[[Any], None]] | None = None,
                          durable: bool | None = None) -> None:
        """``reservation_timeout``: seconds after which a reservation nobody renewed (its
        process was killed mid-call) is given back (default 60; a live process renews its
        running calls' reservations every third of it, so calls may run longer).
        ``alert_sinks`` replaces the sinks
        (default: a :class:`LoggingSink`). ``durable=False`` (PostgreSQL) commits budget
        updates without waiting for the disk: several times faster, still atomic, but a
        database *server* crash may forget the last fraction of a second of them."""
        book = self._budget_book()
        if durable is not None:
            book._driver.durable = bool(durable)
        if reservation_timeout is not None:
            if reservation_timeout <= 0:
                raise ConfigurationError(
                    f"reservation_timeout must be > 0, got {reservation_timeout}")
            book.reservation_timeout = float(reservation_timeout)
        if alert_sinks is not None:
            book.sinks = list(alert_sinks)

    def add_alert_sink(self, sink: Callable[[Any], None]) -> None:
        """Also send budget alerts to ``sink(alert)`` (any callable, a WebhookSink, ...)."""
        book = self._budget_book()
        book.sinks = [*book.sinks, sink]

    def budget_status(self, budget: str | None = None, *, key: str | None = None) -> list[Any]:
        """Used, reserved, remaining and percentage of each budget's current window(s)."""
        book = self._current_budgets()
        return [] if book is None else book.status(budget=budget, key=key)

    def approve(self, budget: str, *, extra: float | None = None,
                expires: dt.datetime | dt.timedelta | float | None = None,
                by: str | None = None, key: str | None = None, run_id: str | None = None,
                reason: str | None = None) -> Any:
        """Lift the critical stop of ``budget`` for its current window.

        ``extra`` raises the stop by that amount (dollars or tokens); without it the window
        has no stop until ``expires`` (a datetime, timedelta or seconds). For budgets held
        per user / model / tag / run, ``key`` names which one (and ``run_id`` the run of a
        per-run budget). Stored; see :meth:`approvals`.
        """
        return self._budget_book().approve(budget, extra=extra, expires=expires, by=by,
                                           key=key, run_id=run_id, reason=reason)

    def approvals(self, budget: str | None = None, *, active: bool | None = None) -> list[Any]:
        """Stored approvals (``active=True``: only those lifting a stop right now)."""
        book = self._current_budgets()
        return [] if book is None else book.approvals(budget=budget, active=active)

    def alerts(self, budget: str | None = None, *, since: dt.datetime | None = None
               ) -> list[Any]:
        """Stored budget alerts, oldest first."""
        book = self._current_budgets()
        return [] if book is None else book.alerts(budget=budget, since=since)

    def budget_headroom(self, *, model: str | None = None, user_id: str | None = None,
                        project: str | None = None, tags: Iterable[str] = (),
                        operation_type: str | None = None,
                        run_id: str | None = None) -> float | None:
        """The smallest remaining fraction (0..1) of the budgets such a call would count
        in; ``None`` when no budget applies. The router downgrades when this runs low."""
        book = self._current_budgets()
        if book is None:
            return None
        from budgetkit.budgets import attribution_ticket

        price = self.catalog.resolve(model) if model else None
        return book.headroom(attribution_ticket(
            model=model, user_id=user_id, project=project or self.project, tags=tags,
            operation_type=operation_type, run_id=run_id, price=price,
            provider=price.provider if price is not None else None))

    def check_stream(self, ticket: Ticket, output_tokens_so_far: int) -> None:
        """Call while streaming: raises :class:`BudgetExceeded` once the output outgrows the
        ticket's reservation in a budget that stops streams (per-run budgets by default)
        and the window has no room left. Cheap: no database trip while within the
        reservation."""
        if type(output_tokens_so_far) is not int or output_tokens_so_far < 0:
            output_tokens_so_far = token_count("output_tokens_so_far", output_tokens_so_far)
        if self._budgets is not None:
            self._budgets.check_stream(ticket, output_tokens_so_far)

    def reclaim_reservations(self) -> int:
        """Give back reservations past their timeout now (admit also does it every minute)."""
        return 0 if self._budgets is None else self._budgets.reap()
