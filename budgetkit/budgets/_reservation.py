"""What an admitted call holds in one budget window. Apart from the book so admission
lanes, which hand out reservations too, need not import the book."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ._budget import Budget

__all__ = ["Reservation"]


@dataclass
class Reservation:
    """What a ticket holds in one budget window (``amount`` in the budget's unit).

    ``window_id`` is None for a per-run budget of a call outside any run (checked in
    memory, nothing stored).
    """

    window_id: int | None
    budget: Budget
    scope_key: str
    window_start: dt.datetime
    amount: int
    leased: bool = False  # admitted from this process's lease (see _budget_lease)
