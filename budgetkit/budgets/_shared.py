"""Budgets stored in the ledger: registered once, enforced by every engine on the ledger.

A budget used to be configuration of the process that registered it: another process on
the same ledger (a worker started without the budget file, a batch job) spent straight
through it. Now ``add_budget`` writes the definition to ``budgetkit_budget_definition`` and
raises the one-row version counter in ``budgetkit_budget_registry`` in the same
transaction; every engine on the ledger reads that counter at most once a second (one tiny
read, from the call that finds the second elapsed) and re-reads the definitions only when
it moved. A budget added, changed or removed by code, a TOML file or ``budgetkit budgets``
is therefore enforced by every engine within about a second.

``add_budget(..., shared=False)`` keeps a budget local to one engine, as before; a local
budget shadows a stored one of the same name in that engine.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from typing import Any

from sqlalchemy import delete, select, update

from budgetkit.errors import ConfigurationError

from ._budget import Budget, parse_budget
from ._sql import insert_ignore
from ._tables import BudgetDefinitionRow, BudgetRegistryRow

__all__ = ["SharedBudgets", "POLL_INTERVAL", "budget_definition"]

logger = logging.getLogger("budgetkit")

#: Seconds (wall) between two reads of the registry's version by one engine.
POLL_INTERVAL = 1.0

_DEFS = BudgetDefinitionRow.__table__  # type: ignore[attr-defined]
_REGISTRY = BudgetRegistryRow.__table__  # type: ignore[attr-defined]


def budget_definition(budget: Budget) -> str:
    """A budget's fields as the JSON stored in the ledger (canonical: sorted keys)."""
    return json.dumps(dataclasses.asdict(budget), sort_keys=True)


class SharedBudgets:
    """The budget definitions of one ledger (a :class:`~budgetkit.ledger.Store`)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._broken: set[str] = set()  # definitions logged as unreadable (once each)

    def version(self) -> int:
        """The registry's version: 0 while no budget was ever stored. One small read."""
        self.store.ensure_tables()
        with self.store.engine.connect() as conn:
            value = conn.execute(select(_REGISTRY.c.version)
                                 .where(_REGISTRY.c.id == 1)).scalar()
        return int(value or 0)

    def read(self) -> tuple[int, dict[str, Budget]]:
        """The version and every stored budget (one transaction, so they agree)."""
        self.store.ensure_tables()
        with self.store.engine.connect() as conn:
            version = conn.execute(select(_REGISTRY.c.version)
                                   .where(_REGISTRY.c.id == 1)).scalar()
            rows = conn.execute(select(_DEFS.c.name, _DEFS.c.definition)
                                .order_by(_DEFS.c.name)).all()
        budgets: dict[str, Budget] = {}
        for name, definition in rows:
            try:
                budgets[name] = parse_budget(json.loads(definition),
                                             source="the ledger's budget definitions")
            except (ConfigurationError, ValueError) as exc:
                # A definition this version cannot read (written by a newer budgetkit?):
                # said loudly, once; the other budgets are still enforced.
                if name not in self._broken:
                    self._broken.add(name)
                    logger.error("budgetkit: cannot read stored budget %r, not enforcing "
                                 "it here: %s", name, exc)
        return int(version or 0), budgets

    def put(self, budget: Budget, *, replace: bool = False, by: str | None = None) -> bool:
        """Store ``budget`` (under its name). A different stored budget of that name needs
        ``replace``; the same one is a no-op. Returns whether anything changed."""
        if not isinstance(budget, Budget):
            raise ConfigurationError(
                f"add_budget() takes a Budget, got {type(budget).__name__}")
        definition = budget_definition(budget)
        self.store.ensure_tables()
        with self.store.engine.begin() as conn:
            version = self._bump(conn)  # first: it serialises writers of definitions
            known = conn.execute(select(_DEFS.c.definition)
                                 .where(_DEFS.c.name == budget.name)).scalar()
            if known == definition:
                conn.rollback()  # nothing changed: the version stays
                return False
            if known is not None and not replace:
                raise ConfigurationError(
                    f"budget {budget.name!r}, field 'name': a different budget has this name "
                    "in the ledger; pass replace=True (CLI: budgetkit budgets set) to "
                    "redefine it")
            values = {"definition": definition, "version": version,
                      "updated_at": _utcnow(), "updated_by": by}
            if known is None:
                conn.execute(_DEFS.insert().values(name=budget.name, **values))
            else:
                conn.execute(update(_DEFS).where(_DEFS.c.name == budget.name).values(**values))
        return True

    def remove(self, name: str) -> bool:
        """Delete a stored budget; False if there was none of that name."""
        self.store.ensure_tables()
        with self.store.engine.begin() as conn:
            self._bump(conn)
            gone = conn.execute(delete(_DEFS).where(_DEFS.c.name == name)).rowcount
            if not gone:
                conn.rollback()
        return bool(gone)

    def _bump(self, conn: Any) -> int:
        statement = insert_ignore(self.store, _REGISTRY)
        if statement is not None:
            conn.execute(statement.values(id=1, version=0))
        elif conn.execute(select(_REGISTRY.c.id).where(_REGISTRY.c.id == 1)).first() is None:
            conn.execute(_REGISTRY.insert().values(id=1, version=0))
        conn.execute(update(_REGISTRY).where(_REGISTRY.c.id == 1)
                     .values(version=_REGISTRY.c.version + 1))
        return int(conn.execute(select(_REGISTRY.c.version)
                                .where(_REGISTRY.c.id == 1)).scalar_one())


def _utcnow() -> dt.datetime:
    return dt.datetime.fromtimestamp(time.time(), dt.timezone.utc).replace(tzinfo=None)
