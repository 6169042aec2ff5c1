"""Money as integers.

Counters and rows hold integer nano-dollars (1e-9 USD), so sums never drift. Prices are
integer pico-dollars per token (1e-12 USD): list prices such as $0.0375 per million tokens
are 37.5 nano-dollars per token, which an integer nano price could not hold exactly.
Floats appear only at the API edge.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
PICOS_PER_NANO = 1_000
PICOS_PER_USD_PER_MTOK = 1_000_000  # $1 per million tokens = 1e-6 USD/token = 1e6 picos/token


def usd_to_nanos(amount: Decimal | float | int | str) -> int:
    """Convert a USD amount to integer nano-dollars (half-up)."""
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        raise ValueError(f"not a money amount: {amount!r}") from None
    if not value.is_finite():
        raise ValueError(f"not a finite money amount: {amount!r}")
    return int((value * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def nanos_to_usd(nanos: int) -> float:
    """Integer nano-dollars to a float USD amount (for display and the public API)."""
    return nanos / NANOS_PER_USD


def nanos_to_decimal(nanos: int) -> Decimal:
    """Integer nano-dollars to an exact Decimal USD amount."""
    return Decimal(nanos) / NANOS_PER_USD


def per_mtok_to_picos(price_per_million: Decimal | str | float | int) -> int:
    """USD per million tokens to integer pico-dollars per token (exact for list prices)."""
    value = Decimal(str(price_per_million)) * PICOS_PER_USD_PER_MTOK
    if value != value.to_integral_value():
        raise ValueError(f"price {price_per_million} per 1M tokens is finer than 1e-12 USD/token")
    return int(value)


def picos_to_nanos(picos: int) -> int:
    """Round a pico-dollar amount to nano-dollars, half-up (non-negative amounts)."""
    return (picos + PICOS_PER_NANO // 2) // PICOS_PER_NANO


_CENT = Decimal("0.01")


def format_usd(amount: Decimal | float | int | None) -> str:
    """Money as budgetkit shows it everywhere (CLI, HTTP API ``*_text`` fields, dashboard):
    ``$1,234.50``, ``$12.35``, ``$0.0420``, ``$0.004210``, ``$0``, ``-$2.50``; ``-`` for
    ``None``. Small amounts get more digits (four from one cent, six below) so a call's cost
    is visible; rounding is half-up on the decimal value (a float is read as its shortest
    repr, so ``nanos_to_usd(n)`` and ``nanos_to_decimal(n)`` print the same).
    """
    if amount is None:
        return "-"
    value = amount if isinstance(amount, Decimal) else Decimal(str(amount))
    if not value.is_finite():
        raise ValueError(f"not a finite money amount: {amount!r}")
    size = abs(value)
    if size == 0:
        return "$0"
    places = _CENT if size >= 1 else Decimal("0.0001") if size >= _CENT else Decimal("0.000001")
    text = f"{size.quantize(places, rounding=ROUND_HALF_UP):,}"
    return ("-$" if value < 0 else "$") + text
