"""Budget reports: status rows, alerts and approvals of the budgets an engine holds.

Budget *definitions* live in code or a budget file registered on the engine; windows,
alerts and approvals live in the database. So a reader in another process (the CLI, the
HTTP server) sees every stored alert and approval, and the status of the budgets it has
loaded (``budgetkit --budgets budgets.toml ...``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from ._reports import as_source, run_query

__all__ = ["as_plain", "budget_rows", "alert_rows", "approval_rows", "budget_report"]


def as_plain(value: Any) -> Any:
    """Budget statuses, alerts, approvals, ... as JSON-ready dicts and lists.

    Non-finite floats (an approval without cap has an infinite stop) become ``None``, so
    the result is valid JSON for browsers too.
    """
    if isinstance(value, Mapping):
        return {str(k): as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [as_plain(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return as_plain(value.value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return as_plain(value.to_dict())
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _has_budgets(engine: Any) -> bool:
    budgets = getattr(engine, "budgets", None)
    return bool(budgets()) if callable(budgets) else False


def budget_rows(engine: Any, *, user_id: str | None = None) -> list[dict[str, Any]]:
    """``engine.budget_status()`` as dicts (``percent`` = used / limit × 100).

    ``user_id`` keeps only that user's windows of per-user budgets (user-scoped readers).
    """
    if engine is None or not _has_budgets(engine):
        return []
    rows = [as_plain(item) for item in engine.budget_status()]
    for row in rows:
        row["percent"] = row.get("percentage")
        row.setdefault("name", row.get("budget"))
    if user_id is not None:
        names = {b.name for b in engine.budgets() if b.scope == "user"}
        rows = [r for r in rows if r.get("budget") in names and r.get("scope_key") == user_id]
    return rows


def alert_rows(source: Any, *, since: dt.datetime | None = None, limit: int = 50,
               budgets: set[str] | None = None) -> list[dict[str, Any]]:
    """Stored budget alerts, newest last (the last ``limit``), read from the database.

    Read from the alert table, so alerts fired by other processes (and for budgets this
    process has not loaded) are included.
    """
    from budgetkit.budgets import BudgetAlertRow
    from budgetkit.ledger import table_of

    src = as_source(source)
    table = table_of(BudgetAlertRow)
    query = select(table).order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit)
    if since is not None:
        query = query.where(table.c.created_at >= since)
    if budgets is not None:
        query = query.where(table.c.budget.in_(sorted(budgets)))
    out = []
    for row in reversed(run_query(src, query)):
        m = row._mapping
        scale = 1e9 if m["unit"] == "usd" else 1.0
        kind, _, threshold = m["kind"].partition(":")
        out.append({
            "budget": m["budget"], "kind": kind, "level": m["level"],
            "threshold": float(threshold) if kind == "threshold" and threshold else None,
            "period": m["period"], "unit": m["unit"], "scope_key": m["scope_key"],
            "window_start": m["window_start"].isoformat(), "spent": m["spent"] / scale,
            "reserved": m["reserved"] / scale, "limit": m["limit_amount"] / scale,
            "percentage": 100.0 * m["spent"] / m["limit_amount"] if m["limit_amount"] else None,
            "message": m["message"], "created_at": m["created_at"].isoformat()})
    return out


def approval_rows(engine: Any) -> list[dict[str, Any]]:
    """Stored approvals (needs the budgets loaded to tell which are active)."""
    if engine is None or not callable(getattr(engine, "approvals", None)):
        return []
    return [as_plain(item) for item in engine.approvals()]


def budget_report(source: Any, *, alerts_limit: int = 50,
                  user_id: str | None = None) -> dict[str, Any]:
    """Used / reserved / remaining / percentage per budget window, recent alerts, approvals."""
    src = as_source(source)
    engine = src.engine
    rows = budget_rows(engine, user_id=user_id)
    allowed = None
    if user_id is not None:  # a user sees alerts of the budgets held for them only
        allowed = {r["budget"] for r in rows}
    return {"budgets": rows,
            "alerts": alert_rows(src, limit=alerts_limit, budgets=allowed),
            "approvals": [] if user_id is not None else approval_rows(engine)}
