"""Money as text in API responses, formatted by the same function as the CLI and dashboard.

Every amount in USD keeps its number (``total_cost_usd``) and gets its text beside it
(``total_cost_text``: ``"$0.004210"``), made by :func:`budgetkit.pricing.format_usd`. The
dashboard prints those texts and formats no money itself, so the terminal, the JSON and the
page cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from budgetkit.pricing import format_usd

__all__ = ["with_money_text", "money_ticks"]

# Amounts of USD budgets (token budgets keep only their numbers).
_BUDGET_AMOUNTS = ("limit", "used", "reserved", "remaining", "approved_extra", "stop")


def with_money_text(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` with a ``<name>_text`` beside each ``<name>_usd`` number, at any depth, and
    beside the amounts of USD budget rows (``used_text``, ``limit_text``, ...)."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        out[key] = _texted(item)
        if isinstance(key, str) and key.endswith("_usd") and _is_amount(item):
            out[f"{key[:-4]}_text"] = format_usd(item)
    if value.get("unit") == "usd" and "budget" in value:
        for key in _BUDGET_AMOUNTS:
            if _is_amount(value.get(key)):
                out[f"{key}_text"] = format_usd(value[key])
    return out


def _texted(value: Any) -> Any:
    if isinstance(value, Mapping):
        return with_money_text(value)
    if isinstance(value, list | tuple):
        return [_texted(item) for item in value]
    return value


def money_ticks(top: float, steps: int = 4) -> list[str]:
    """Axis labels from 0 to ``top`` (1 when nothing was spent), as the dashboard draws them."""
    top = top if top > 0 else 1.0
    return [format_usd(top * i / steps) for i in range(steps + 1)]


def _is_amount(item: Any) -> bool:
    return isinstance(item, int | float) and not isinstance(item, bool)
