"""The ``budgetkit`` command: reports, budgets, alerts, approvals, export, prices, purge,
rollups, the HTTP server and the demo. ``main(argv)`` is the entry point."""

from __future__ import annotations

from ._main import main as main

__all__ = ["main"]
