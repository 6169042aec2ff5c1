"""``budgetkit budgets add|set|remove``: change the budgets stored in the ledger.

A stored budget is enforced by every engine on the ledger within about a second (see
``budgetkit.budgets._shared``), so an operator can add, tighten or lift a budget while the
application runs, without restarting or redeploying a budget file.

    budgetkit budgets add daily --limit 50                       # global, per day, USD
    budgetkit budgets add ana --limit 5 --scope user --match ana --period week
    budgetkit budgets add --file budgets.toml                    # every budget of a file
    budgetkit budgets set daily --limit 80                       # change some fields
    budgetkit budgets remove daily
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from budgetkit.budgets import Budget, SharedBudgets, load_budgets, parse_budget
from budgetkit.errors import ConfigurationError

__all__ = ["add_arguments", "change_budgets", "CHANGE_ACTIONS"]

CHANGE_ACTIONS = ("add", "set", "remove")
# option -> Budget field, for the fields a command line can set
_FIELDS = {"limit": "limit", "scope": "scope", "match": "match", "period": "period",
           "unit": "unit", "alert_at": "alert_at", "description": "description",
           "provider": "provider"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``budgets add|set|remove`` (on the ``budgets`` parser)."""
    parser.add_argument("name", nargs="?", help="add/set/remove: the budget's name")
    parser.add_argument("--limit", type=float, help="add/set: dollars (or tokens)")
    parser.add_argument("--scope", help="add/set: global, user, project, model, tag, "
                                        "operation or run")
    parser.add_argument("--match", help="add/set: the scope's value (a user id, a glob ...)")
    parser.add_argument("--period", help="add/set: run, hour, day, week, month or total")
    parser.add_argument("--unit", help="add/set: usd or tokens")
    parser.add_argument("--alert-at", help="add/set: fractions of the limit, e.g. 0.5,0.8,1")
    parser.add_argument("--provider", help="add/set: only this provider's models")
    parser.add_argument("--description", help="add/set: a note shown with the budget")
    parser.add_argument("--file", help="add/set: store every budget of a TOML/JSON file")
    parser.add_argument("--by", default=os.environ.get("USER"), help="add/set: who changes it")


def change_budgets(args: argparse.Namespace, store: Any) -> tuple[dict[str, Any], str]:
    """Run ``budgets add|set|remove`` on the ledger of ``store``; returns what to print
    (the JSON payload and the text). Raises :class:`ConfigurationError` naming what was
    wrong, with nothing stored."""
    registry = SharedBudgets(store)
    action = args.action
    given = _given_fields(args)
    if action == "remove":
        if args.file or given:
            raise ConfigurationError("budgets remove takes a budget name only")
        name = _name(args)
        if not registry.remove(name):
            _, stored = registry.read()
            raise ConfigurationError(f"unknown budget {name!r} in the ledger; stored: "
                                     f"{', '.join(sorted(stored)) or 'none'}")
        return ({"removed": name},
                f"Removed budget {name!r} from the ledger: every engine on it stops "
                "enforcing it within a second.")
    if args.file:
        if args.name or given:
            raise ConfigurationError(f"budgets {action} --file takes no name or fields")
        budgets = load_budgets(args.file)  # every entry checked before any is stored
        _, stored = registry.read()
        if action == "add":
            for budget in budgets:
                known = stored.get(budget.name)
                if known is not None and known != budget:
                    raise ConfigurationError(
                        f"{args.file}: budget {budget.name!r}, field 'name': a different "
                        "budget has this name in the ledger; use budgets set --file")
    else:
        budgets = [_from_fields(action, _name(args) if action == "set" else args.name,
                                given, registry)]
    changed = [budget.name for budget in budgets
               if registry.put(budget, replace=action == "set", by=args.by)]
    names = ", ".join(repr(budget.name) for budget in budgets)
    text = (f"Stored budget(s) {names} in the ledger: every engine on it enforces them "
            "within a second." if changed else f"Budget(s) {names} already stored as given.")
    return ({"stored": [dataclasses.asdict(budget) for budget in budgets],
             "changed": changed}, text)


def _name(args: argparse.Namespace) -> str:
    if not args.name:
        raise ConfigurationError(f"budgets {args.action} needs a budget name")
    return str(args.name)


def _given_fields(args: argparse.Namespace) -> dict[str, Any]:
    given: dict[str, Any] = {}
    for option, field in _FIELDS.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        if option == "alert_at":
            try:
                value = [float(part) for part in str(value).split(",") if part.strip()]
            except ValueError:
                raise ConfigurationError(f"--alert-at: expected fractions separated by "
                                         f"commas, got {args.alert_at!r}") from None
        given[field] = value
    return given


def _from_fields(action: str, name: str | None, given: dict[str, Any],
                 registry: SharedBudgets) -> Budget:
    if action == "add":
        if "limit" not in given:
            raise ConfigurationError("budgets add needs --limit")
        return parse_budget({**given, **({"name": name} if name else {})},
                            source="the command line")
    _, stored = registry.read()
    known = stored.get(name or "")
    if known is None:
        raise ConfigurationError(f"unknown budget {name!r} in the ledger (stored: "
                                 f"{', '.join(sorted(stored)) or 'none'}); add it with "
                                 "budgets add")
    if not given:
        raise ConfigurationError("budgets set needs at least one field to change "
                                 "(--limit, --period, ...)")
    fields = dataclasses.asdict(known)
    fields.update(given)
    if "scope" in given and given["scope"] == "global":
        fields["match"] = None
    return parse_budget(fields, source="the command line")
