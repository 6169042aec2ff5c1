"""Checks for the numbers callers hand us: token counts and nano-dollar amounts.

A NaN or an infinity that reaches a usage row makes the database refuse the row later,
far from the caller, and the call is lost from the ledger. So every public entry point
that takes a count checks it first and raises :class:`ConfigurationError` naming the
argument. Callers check ``type(value) is int and value >= 0`` inline first (the hot
path: a few nanoseconds) and call these only when that fails.
"""

from __future__ import annotations

import math
import operator

from budgetkit.errors import ConfigurationError

__all__ = ["token_count", "nonnegative_int", "finite_number"]


def nonnegative_int(field: str, value: object, *, what: str = "a whole number") -> int:
    """``value`` as an ``int`` >= 0, or :class:`ConfigurationError` naming ``field``.

    Accepts ints and integer-like numbers (``numpy.int64``) and floats that are whole
    (``12.0``: some SDKs report counts as floats). Refuses booleans, NaN, infinities,
    fractions, negative numbers and anything else.
    """
    if isinstance(value, bool):
        raise ConfigurationError(f"{field} must be {what} >= 0, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ConfigurationError(f"{field} must be {what} >= 0, got {value!r}")
        number = int(value)
    else:
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigurationError(
                f"{field} must be {what} >= 0, got {type(value).__name__} {value!r}"
            ) from None
    if number < 0:
        raise ConfigurationError(f"{field} must be {what} >= 0, got {value!r}")
    return number


def token_count(field: str, value: object) -> int:
    """A token count given as ``field``: a whole number >= 0 (see :func:`nonnegative_int`)."""
    return nonnegative_int(field, value, what="a whole number of tokens")


def finite_number(field: str, value: object, *, minimum: float | None = 0.0) -> float:
    """``value`` as a finite float (>= ``minimum`` unless None), or a
    :class:`ConfigurationError` naming ``field``."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{field} must be a number, got {value!r}")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"{field} must be a number, got {type(value).__name__} {value!r}") from None
    number = float(value)
    if not math.isfinite(number):
        raise ConfigurationError(f"{field} must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigurationError(f"{field} must be >= {minimum:g}, got {value!r}")
    return number
