"""budgetkit's exceptions: one tree, so ``except BudgetkitError`` catches all of ours.

    BudgetkitError
    ├── ConfigurationError          bad arguments, malformed catalog / budget files
    │   └── CatalogError            a price catalog file or entry is malformed
    ├── UnknownModelError           (also a KeyError) a model the catalog does not know
    ├── ContextWindowExceeded       no model / window can take this prompt
    ├── BudgetExceeded              a call would break a budget (level critical or over)
    │   └── ApprovalRequired        the budget is at its critical level and needs approval
    └── StoreUnavailable            the database cannot be reached (only raised by reads)

Every error names the thing that was wrong, so the message alone is enough to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "BudgetkitError",
    "ConfigurationError",
    "CatalogError",
    "UnknownModelError",
    "ContextWindowExceeded",
    "BudgetExceeded",
    "ApprovalRequired",
    "StoreUnavailable",
]


class BudgetkitError(Exception):
    """Base class of every error budgetkit raises on purpose."""


class ConfigurationError(BudgetkitError, ValueError):
    """An argument, setting or file is invalid. Nothing was changed."""


class CatalogError(ConfigurationError):
    """A price catalog file or entry is malformed."""

    def __init__(self, message: str, *, source: str | None = None, entry: str | None = None,
                 field: str | None = None) -> None:
        where = ", ".join(
            f"{label} {value!r}"
            for label, value in (("file", source), ("entry", entry), ("field", field))
            if value is not None
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.entry, self.field = source, entry, field


class UnknownModelError(BudgetkitError, KeyError):
    """The price catalog has no entry for this model."""

    def __init__(self, model: str, suggestions: Sequence[str] = ()) -> None:
        self.model = model
        self.suggestions = list(suggestions)
        hint = f"; closest known: {', '.join(self.suggestions)}" if self.suggestions else ""
        super().__init__(
            f"unknown model {model!r}{hint}. Add it with catalog.register(...) or set a "
            "fallback price."
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ContextWindowExceeded(BudgetkitError):
    """A prompt does not fit any candidate model's context window."""

    def __init__(self, message: str, *, tokens: int | None = None,
                 limit: int | None = None) -> None:
        super().__init__(message)
        self.tokens, self.limit = tokens, limit


class BudgetExceeded(BudgetkitError):
    """A call was stopped before it ran because it would break a budget."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details
        for key, value in details.items():
            setattr(self, key, value)


class ApprovalRequired(BudgetExceeded):
    """The budget reached its critical level; calls resume once someone approves."""


class StoreUnavailable(BudgetkitError):
    """The usage store could not be reached for a read."""
