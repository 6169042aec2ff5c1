"""Budget files: a list of budgets (and named presets) in TOML or JSON, every entry checked
before any is returned. Apart from the Budget class so the presets, which build Budgets,
can be named in a file without an import circle."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from budgetkit.errors import ConfigurationError

from ._budget import Budget, parse_budget
from ._presets import preset

__all__ = ["load_budgets"]


def load_budgets(path: str | Path) -> list[Budget]:
    """Budgets from a TOML or JSON file.

    The file holds a list ``budget`` (TOML ``[[budget]]`` tables) or ``budgets``, and may
    name presets: ``presets = ["token-ladders", "model-token-budgets"]``. Every entry is
    checked before any is returned; a mistake raises :class:`ConfigurationError` naming the
    file, the budget and the field.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read budget file {str(path)!r}: {exc}") from None
    source = str(path)
    try:
        if path.suffix.lower() == ".json":
            document = json.loads(raw)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            document = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{source}: not valid {path.suffix.lstrip('.') or 'TOML'}: "
                                 f"{exc}") from None
    if isinstance(document, list):
        document = {"budgets": document}
    if not isinstance(document, Mapping):
        raise ConfigurationError(f"{source}: expected a table with 'budget' entries")
    unknown = sorted(set(document) - {"budget", "budgets", "presets"})
    if unknown:
        raise ConfigurationError(f"{source}: unknown top-level key {unknown[0]!r}; "
                                 "use 'budget', 'budgets' or 'presets'")
    entries: list[Any] = [*document.get("budget", []), *document.get("budgets", [])]
    budgets: list[Budget] = []
    presets = document.get("presets", [])
    if isinstance(presets, str):
        presets = [presets]
    for name in presets:
        try:
            budgets.extend(preset(name))
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: {exc}") from None
    for index, entry in enumerate(entries, 1):
        budgets.append(parse_budget(entry, source=source, index=index))
    seen: set[str] = set()
    for budget in budgets:
        if budget.name in seen:
            raise ConfigurationError(f"{source}: budget {budget.name!r}, field 'name': "
                                     "defined twice")
        seen.add(budget.name)
    return budgets

