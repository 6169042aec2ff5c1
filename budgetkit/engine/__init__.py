"""The facade for one LLM call: :class:`Engine` composes the ledger, budgets and cache and
hands each step of a call (admit, settle, release, record) to the service that owns it.
"""

from __future__ import annotations

from ._engine import Engine as Engine

__all__ = ['Engine']
