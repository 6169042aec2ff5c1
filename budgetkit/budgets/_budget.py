"""Budget definitions: scope × period × unit, graded levels, and calendar windows.

A :class:`Budget` is pure data, validated when it is made. The budget book
(``_budget_book``) enforces it against the store; this module only answers "does this
budget apply to that call, under which key?" and "which window is *now* in?".

Windows are keyed by their start (naive UTC), calendar-aligned in the budget's time zone,
so a new day or month needs no reset job: the first call in it creates its row.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from budgetkit.errors import ConfigurationError
from budgetkit.pricing import nanos_to_usd, usd_to_nanos

if TYPE_CHECKING:
    from budgetkit.ledger import Ticket

__all__ = [
    "Budget",
    "BudgetLevels",
    "PERIODS",
    "SCOPES",
    "UNITS",
    "window_bounds",
    "parse_budget",
]

Period = Literal["run", "hour", "day", "week", "month", "total"]
Scope = Literal["global", "user", "project", "model", "tag", "operation", "run"]
Unit = Literal["usd", "tokens"]
PERIODS: tuple[str, ...] = ("run", "hour", "day", "week", "month", "total")
SCOPES: tuple[str, ...] = ("global", "user", "project", "model", "tag", "operation", "run")
UNITS: tuple[str, ...] = ("usd", "tokens")
LEVELS: tuple[str, ...] = ("normal", "moderate", "high", "critical")

#: Start of the single window of ``total`` and ``run`` periods (a run is keyed by its id).
EPOCH = dt.datetime(1970, 1, 1)
#: An approval without an extra amount lifts the stop entirely for the window.
UNLIMITED = 10**15


def _budget_error(budget: str | None, field_name: str, message: str) -> ConfigurationError:
    label = f"budget {budget!r}" if budget else "budget"
    return ConfigurationError(f"{label}, field {field_name!r}: {message}")


@dataclass(frozen=True)
class BudgetLevels:
    """Where the graded levels of a budget start (Token Budget seed).

    normal → continue; ``moderate`` → log a warning; ``high`` → alert and flag the call
    for review; ``critical`` → stop and require approval. Values are fractions of the
    budget's limit (``0.8`` = 80 %), or absolute amounts in the budget's unit when
    ``absolute=True`` (USD for USD budgets, tokens for token budgets).
    ``critical=None`` means the limit itself.
    """

    moderate: float | None = None
    high: float | None = None
    critical: float | None = None
    absolute: bool = False

    #: Fractions used when a level is not given (and the levels are fractions).
    DEFAULTS = (0.8, 0.95)

    def amounts(self, limit: int, unit: str, budget: str | None = None) -> tuple[int, int, int]:
        """(moderate, high, critical) as integer amounts of the budget's unit."""
        if not isinstance(self.absolute, bool):
            raise _budget_error(budget, "levels.absolute",
                                f"must be true or false, got {self.absolute!r}")

        def convert(name: str, value: float | None) -> int | None:
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise _budget_error(budget, f"levels.{name}",
                                    f"must be a positive number, got {value!r}")
            if not self.absolute:
                return int(round(limit * value))
            return usd_to_nanos(value) if unit == "usd" else int(value)

        critical = convert("critical", self.critical)
        if critical is not None and critical > limit:
            # Critical is where calls stop; above the limit it would let calls spend past
            # the limit (to 150 %). Refused, not clamped: a silent clamp would hide a typo.
            shown = (f"{self.critical:g}" if self.absolute
                     else f"{self.critical:g} ({self.critical:.0%} of the limit)")
            raise _budget_error(budget, "levels.critical",
                                f"must not be above the limit (critical is where calls stop: "
                                f"the limit unless set lower), got {shown}; raise 'limit' "
                                "instead")
        critical = limit if critical is None else critical
        high = convert("high", self.high)
        moderate = convert("moderate", self.moderate)
        if high is None:
            high = critical if self.absolute else min(critical, round(limit * self.DEFAULTS[1]))
        if moderate is None:
            moderate = high if self.absolute else min(high, round(limit * self.DEFAULTS[0]))
        if not moderate <= high <= critical:
            raise _budget_error(budget, "levels",
                                "must rise: moderate <= high <= critical")
        return moderate, high, critical


@dataclass(frozen=True)
class Budget:
    """A promise about spending: calls that would break it never reach the provider.

    ``Budget(limit=1.00)`` is a global daily budget of one US dollar.

    - ``scope``: ``global``, ``user``, ``project``, ``model``, ``tag``, ``operation`` or
      ``run``. ``match`` fixes the value (``scope="user", match="alice"``); without it the
      budget holds for *each* value separately (each user, each model, each tag of the call,
      each run). A call without that attribute (no ``user_id``) is not counted by a
      ``user`` budget. ``match`` may be a glob (``"gpt-4o*"``), then matching values share
      one window. ``provider`` narrows a budget to one provider's models; ``exclude``
      lists scope values it does not cover.
    - ``period``: ``run`` (each run, keyed by its root run id), ``hour``, ``day``, ``week``
      (from Monday), ``month`` or ``total``; calendar-aligned in ``timezone``.
    - ``unit``: ``usd`` (``limit`` in dollars) or ``tokens`` (input + output tokens).
    - ``levels``: see :class:`BudgetLevels`. Crossing ``critical`` stops calls with
      :class:`ApprovalRequired` (or :class:`BudgetExceeded` when
      ``require_approval=False``) until :meth:`Engine.approve` lifts the stop.
    - ``alert_at``: fractions of the limit at which alerts fire, once per window.
    - ``downgrade_below``: when the remaining fraction of the window falls below this,
      admitted calls carry the decision ``"downgrade"`` (the router acts on it).
    - ``stop_streams``: stop a stream that outgrows its reservation when the window has no
      room (default: on for ``run`` budgets, off otherwise).
    - ``count_earlier_spend``: a window opened after calls were already recorded in it (the
      budget is new, or got a new period) starts from the ledger's spend in that window.
    """

    limit: float
    name: str = ""
    scope: Scope = "global"
    match: str | None = None
    period: Period = "day"
    unit: Unit = "usd"
    timezone: str = "UTC"
    levels: BudgetLevels = field(default_factory=BudgetLevels)
    alert_at: tuple[float, ...] = (0.5, 0.8, 0.95, 1.0)
    require_approval: bool = True
    downgrade_below: float | None = 0.2
    stop_streams: bool | None = None
    provider: str | None = None
    exclude: tuple[str, ...] = ()
    count_earlier_spend: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        name = self.name or None
        if not isinstance(self.name, str):
            raise _budget_error(None, "name", f"must be a string, got {self.name!r}")
        if self.scope not in SCOPES:
            raise _budget_error(name, "scope",
                                f"unknown scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if self.period not in PERIODS:
            raise _budget_error(name, "period", f"unknown period {self.period!r}; "
                                f"use one of {', '.join(PERIODS)}")
        if self.unit not in UNITS:
            raise _budget_error(name, "unit",
                                f"unknown unit {self.unit!r}; use one of {', '.join(UNITS)}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)) \
                or not math.isfinite(self.limit) or self.limit <= 0:
            raise _budget_error(name, "limit", f"must be a positive number, got {self.limit!r}")
        if self.match is not None and (not isinstance(self.match, str) or not self.match):
            raise _budget_error(name, "match", f"must be a non-empty string, got {self.match!r}")
        if self.scope == "global" and self.match is not None:
            raise _budget_error(name, "match", "a global budget has no match value")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise _budget_error(name, "timezone",
                                f"unknown time zone {self.timezone!r}") from None
        if not isinstance(self.levels, BudgetLevels):
            raise _budget_error(name, "levels", "must be a BudgetLevels")
        if isinstance(self.alert_at, (str, bytes)) or not hasattr(self.alert_at, "__iter__"):
            raise _budget_error(name, "alert_at",
                                f"must be a list of fractions, got {self.alert_at!r}")
        alerts = tuple(self.alert_at)
        for value in alerts:
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value < math.inf:  # (NaN fails this too)
                raise _budget_error(name, "alert_at",
                                    f"thresholds must be positive fractions, got {value!r}")
        set_(self, "alert_at", tuple(sorted(set(float(v) for v in alerts))))
        if self.downgrade_below is not None and (
                isinstance(self.downgrade_below, bool)
                or not isinstance(self.downgrade_below, (int, float))
                or not 0 <= self.downgrade_below <= 1):
            raise _budget_error(name, "downgrade_below",
                                f"must be a fraction in [0, 1], got {self.downgrade_below!r}")
        for flag in ("require_approval", "count_earlier_spend"):
            if not isinstance(getattr(self, flag), bool):
                raise _budget_error(name, flag,
                                    f"must be true or false, got {getattr(self, flag)!r}")
        if self.stop_streams is not None and not isinstance(self.stop_streams, bool):
            raise _budget_error(name, "stop_streams",
                                f"must be true, false or unset, got {self.stop_streams!r}")
        for text_field in ("provider", "description"):
            value = getattr(self, text_field)
            if value is not None and not isinstance(value, str):
                raise _budget_error(name, text_field, f"must be a string, got {value!r}")
        if isinstance(self.exclude, str):
            set_(self, "exclude", (self.exclude,))
        else:
            set_(self, "exclude", tuple(self.exclude))
        if not all(isinstance(value, str) for value in self.exclude):
            raise _budget_error(name, "exclude",
                                f"must be a list of strings, got {list(self.exclude)!r}")
        if not self.name:
            set_(self, "name", "-".join(
                part for part in (self.scope, self.match, self.period, self.unit) if part))
        self.levels.amounts(self.limit_amount, self.unit, self.name)  # validates

    # -- amounts --------------------------------------------------------------------------
    @cached_property
    def limit_amount(self) -> int:
        """The limit as an integer amount: nano-dollars (USD) or tokens."""
        return usd_to_nanos(self.limit) if self.unit == "usd" else int(self.limit)

    @cached_property
    def level_amounts(self) -> tuple[int, int, int]:
        return self.levels.amounts(self.limit_amount, self.unit, self.name)

    @cached_property
    def keep_amount(self) -> int:
        """Used amounts up to this suggest no downgrade (a little below the exact point,
        where the budget book's full judgement decides)."""
        if self.downgrade_below is None:
            return self.limit_amount
        return int(self.limit_amount * (1 - self.downgrade_below)) - 1

    @cached_property
    def stop_amount(self) -> int:
        """Where calls stop (the critical level) before any approval."""
        return self.level_amounts[2]

    @property
    def stops_streams(self) -> bool:
        if self.stop_streams is not None:
            return self.stop_streams
        return self.period == "run" or self.scope == "run"

    def level_of(self, used: int) -> str:
        moderate, high, critical = self.level_amounts
        if used >= critical:
            return "critical"
        if used >= high:
            return "high"
        if used >= moderate:
            return "moderate"
        return "normal"

    def to_unit(self, amount: int) -> float:
        """An integer amount as the public number: dollars or tokens."""
        return nanos_to_usd(amount) if self.unit == "usd" else float(amount)

    def format_amount(self, amount: int) -> str:
        return f"${nanos_to_usd(amount):.6f}" if self.unit == "usd" else f"{amount:,} tokens"

    def amount_of(self, value: float) -> int:
        """A public number (dollars or tokens) as an integer amount of this unit."""
        return usd_to_nanos(value) if self.unit == "usd" else int(value)

    # -- matching -------------------------------------------------------------------------
    def window_keys(self, ticket: Ticket) -> list[str]:
        """The scope keys this call is counted under; empty when the budget does not apply.

        The key is ``""`` for a shared window; for "each value" budgets it is the value
        (each tag of the call gives one key), and ``run`` periods add the run id.
        """
        if self.provider is not None and (ticket.provider or "") != self.provider:
            return []
        if self.scope == "global":
            keys = [""]
        else:
            values = _scope_values(self.scope, ticket)
            values = [value for value in values if value not in self.exclude]
            if self.match is not None:
                if self.scope == "model" and ticket.model not in self.exclude:
                    values = [*values, ticket.model]  # as the caller wrote it, too
                if not any(_matches(self.match, value) for value in values):
                    return []
                keys = [""]
            else:
                keys = list(dict.fromkeys(values))
        if self.period == "run":
            run = _run_key(ticket)
            keys = [f"{key}\x1frun:{run}" if key else f"run:{run}" for key in keys]
        return keys

    def describe_key(self, key: str) -> str:
        if not key:
            return f"{self.scope} {self.match}" if self.match else self.scope
        parts = key.split("\x1f")
        return ", ".join(part if part.startswith("run:") else f"{self.scope} {part}"
                         for part in parts)


def _matches(pattern: str, value: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(value, pattern)
    return value == pattern


def _run_key(ticket: Ticket) -> str:
    return ticket.root_run_id or ticket.run_id or ticket.id


def _scope_values(scope: str, ticket: Ticket) -> list[str]:
    if scope == "user":
        return [ticket.user_id] if ticket.user_id else []
    if scope == "project":
        return [ticket.project] if ticket.project else []
    if scope == "model":  # the catalog's name, so aliases and snapshots share a window
        price = getattr(ticket, "price", None)
        name = price.name if price is not None else ticket.model
        return [name] if name else []
    if scope == "operation":
        return [ticket.operation_type] if ticket.operation_type else []
    if scope == "tag":
        return list(ticket.tags)
    if scope == "run":
        return [_run_key(ticket)]
    raise ConfigurationError(f"unknown budget scope {scope!r}")


# -- windows ----------------------------------------------------------------------------
def _to_utc_naive(local: dt.datetime) -> dt.datetime:
    return local.astimezone(dt.timezone.utc).replace(tzinfo=None)


def window_bounds(period: str, now: dt.datetime, timezone: str = "UTC"
                  ) -> tuple[dt.datetime, dt.datetime | None]:
    """Start and end (naive UTC) of the ``period`` window holding ``now`` (naive UTC).

    Days, weeks (Monday) and months start at local midnight in ``timezone``, so a
    23- or 25-hour day around a daylight-saving change is still one day.
    """
    if period in ("run", "total"):
        return EPOCH, None
    zone = ZoneInfo(timezone)
    local = now.replace(tzinfo=dt.timezone.utc).astimezone(zone)
    if period == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        start_utc = _to_utc_naive(start)
        return start_utc, start_utc + dt.timedelta(hours=1)
    day = local.date()
    if period == "day":
        first, after = day, day + dt.timedelta(days=1)
    elif period == "week":
        first = day - dt.timedelta(days=day.weekday())
        after = first + dt.timedelta(days=7)
    elif period == "month":
        first = day.replace(day=1)
        after = (first + dt.timedelta(days=32)).replace(day=1)
    else:
        raise ConfigurationError(f"unknown budget period {period!r}")

    def midnight(date: dt.date) -> dt.datetime:
        return _to_utc_naive(dt.datetime(date.year, date.month, date.day, tzinfo=zone))

    return midnight(first), midnight(after)


# -- files ------------------------------------------------------------------------------
_LEVEL_FIELDS = {f.name for f in fields(BudgetLevels)}
_BUDGET_FIELDS = {f.name for f in fields(Budget)}


def parse_budget(data: Mapping[str, Any], *, source: str | None = None,
                 index: int | None = None) -> Budget:
    """A :class:`Budget` from a dict (one entry of a budget file)."""
    where = f"{source}: " if source else ""
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"{where}budget #{index}: must be a table/object, "
                                 f"got {type(data).__name__}")
    name = data.get("name") if isinstance(data.get("name"), str) else None
    label = name or (f"#{index}" if index is not None else None)
    unknown = sorted(set(data) - _BUDGET_FIELDS)
    if unknown:
        raise ConfigurationError(f"{where}budget {label!r}, field {unknown[0]!r}: unknown field; "
                                 f"known fields: {', '.join(sorted(_BUDGET_FIELDS))}")
    if "limit" not in data:
        raise ConfigurationError(f"{where}budget {label!r}, field 'limit': missing")
    kwargs = dict(data)
    levels = kwargs.get("levels")
    if levels is not None:
        if not isinstance(levels, Mapping):
            raise ConfigurationError(f"{where}budget {label!r}, field 'levels': must be a table")
        bad = sorted(set(levels) - _LEVEL_FIELDS)
        if bad:
            raise ConfigurationError(f"{where}budget {label!r}, field 'levels.{bad[0]}': unknown "
                                     f"level; use moderate, high, critical, absolute")
        kwargs["levels"] = BudgetLevels(**levels)
    for key in ("alert_at", "exclude"):
        if key in kwargs:
            value = kwargs[key]
            if isinstance(value, str) and key == "exclude":
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ConfigurationError(f"{where}budget {label!r}, field {key!r}: must be a list")
            kwargs[key] = tuple(value)
    try:
        return Budget(**kwargs)
    except ConfigurationError as exc:
        message = str(exc)
        if name is None and index is not None:
            message = message.replace("budget,", f"budget {label!r},", 1)
        raise ConfigurationError(f"{where}{message}") from None
    except TypeError as exc:  # wrong value types the dataclass could not take
        raise ConfigurationError(f"{where}budget {label!r}: {exc}") from None
