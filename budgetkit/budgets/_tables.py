"""SQLModel tables of the budget book: windows, reservations, approvals, alerts.

Amounts are integers in the budget's unit (nano-dollars or tokens); times are naive UTC
in plain ``DateTime`` columns (as the usage ledger).
A window row is the one place a budget's spend lives: reservation is a conditional
``UPDATE`` of that row, so the check and the reserve cannot be split across processes.
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import BigInteger, Column, DateTime, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

__all__ = ["BudgetWindowRow", "BudgetReservationRow", "BudgetApprovalRow", "BudgetAlertRow",
           "BudgetDefinitionRow", "BudgetRegistryRow"]


class BudgetWindowRow(SQLModel, table=True):
    """Spend of one budget in one window (for one scope key: a user, a run, ...)."""

    __tablename__ = "budgetkit_budget_window"
    __table_args__ = (
        UniqueConstraint("budget", "period", "unit", "scope_key", "window_start",
                         name="uq_budgetkit_budget_window"),
    )

    id: Optional[int] = Field(default=None, primary_key=True)
    budget: str = Field(max_length=200)
    period: str = Field(max_length=16)
    unit: str = Field(max_length=16)
    scope_key: str = Field(default="", max_length=500)
    window_start: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))
    window_end: Optional[dt.datetime] = Field(
        default=None, sa_column=Column(DateTime, nullable=True))
    spent: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    reserved: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    created_at: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))


class BudgetReservationRow(SQLModel, table=True):
    """What one admitted call holds in one window until it settles or expires.

    Deleting this row is what decides who gives the amount back (settle, release or the
    reaper of expired reservations), so it is given back exactly once.
    """

    __tablename__ = "budgetkit_budget_reservation"
    __table_args__ = (Index("ix_budgetkit_budget_reservation_expiry", "window_id", "expires_at"),)

    ticket_id: str = Field(primary_key=True, max_length=32)
    window_id: int = Field(primary_key=True)
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    expires_at: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))


class BudgetApprovalRow(SQLModel, table=True):
    """Someone lifted a critical stop for one window, maybe by an extra amount, maybe until."""

    __tablename__ = "budgetkit_budget_approval"
    __table_args__ = (Index("ix_budgetkit_budget_approval_window", "window_id", "expires_at"),)

    id: str = Field(primary_key=True, max_length=32)
    window_id: int
    budget: str = Field(max_length=200)
    scope_key: str = Field(default="", max_length=500)
    window_start: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))
    extra: int = Field(sa_column=Column(BigInteger, nullable=False))
    unlimited: bool = False
    expires_at: Optional[dt.datetime] = Field(
        default=None, sa_column=Column(DateTime, nullable=True))
    approved_by: Optional[str] = Field(default=None, max_length=200)
    reason: Optional[str] = None
    created_at: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))


class BudgetAlertRow(SQLModel, table=True):
    """One alert that fired. The unique key is the cross-process "fire once" guard."""

    __tablename__ = "budgetkit_budget_alert"
    __table_args__ = (
        UniqueConstraint("window_id", "kind", name="uq_budgetkit_budget_alert"),
        Index("ix_budgetkit_budget_alert_time", "created_at"),
    )

    id: Optional[int] = Field(default=None, primary_key=True)
    window_id: int
    kind: str = Field(max_length=40)  # "threshold:0.8", "level:high", "blocked"
    budget: str = Field(max_length=200)
    period: str = Field(max_length=16)
    unit: str = Field(max_length=16)
    scope_key: str = Field(default="", max_length=500)
    window_start: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))
    level: str = Field(max_length=16)
    spent: int = Field(sa_column=Column(BigInteger, nullable=False))
    reserved: int = Field(sa_column=Column(BigInteger, nullable=False))
    limit_amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    message: str
    created_at: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))


class BudgetDefinitionRow(SQLModel, table=True):
    """A budget registered in the ledger: every engine on the ledger enforces it."""

    __tablename__ = "budgetkit_budget_definition"

    name: str = Field(primary_key=True, max_length=200)
    #: The budget's fields as JSON (``parse_budget`` reads them back, checking each).
    definition: str = Field(sa_column=Column(Text, nullable=False))
    #: The registry version that last wrote it.
    version: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))
    updated_by: Optional[str] = Field(default=None, max_length=200)


class BudgetRegistryRow(SQLModel, table=True):
    """One row: the version of the budget definitions, raised by every add, change and
    remove in the same transaction. Engines poll it (one tiny read, at most once a
    second) and read the definitions only when it moved."""

    __tablename__ = "budgetkit_budget_registry"

    id: int = Field(primary_key=True)
    version: int = Field(sa_column=Column(BigInteger, nullable=False))
