"""SQLModel table of the routing package: fitted router scorers, newest last.

A fitted scorer is a few kilobytes to a few hundred kilobytes of JSON (its non-zero hashed
weights). Rows are only ever added, so two processes fitting at once cannot corrupt each
other; a router loads the newest row of its ``name``.
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import Column, DateTime, Text
from sqlmodel import Field, SQLModel

__all__ = ["RouterScorerRow"]


class RouterScorerRow(SQLModel, table=True):
    """One fitted router scorer (``Scorer.to_json()``)."""

    __tablename__ = "budgetkit_router_scorer"

    id: Optional[int] = Field(default=None, primary_key=True)
    #: The router's ``scorer_name``: one ledger can hold scorers for several routers.
    name: str = Field(max_length=200, index=True)
    # Naive UTC, like the usage rows.
    created_at: dt.datetime = Field(sa_column=Column(DateTime, nullable=False))
    n_outcomes: int = 0
    scorer: str = Field(sa_column=Column(Text, nullable=False))
