"""Budget files: a list of budgets (and named presets) in TOML or JSON, every entry checked
before any is returned. Apart from the Budget class so the presets, which build Budgets,
can be named in a file without an import circle."""

from __future__ import annotations

import json
import re
import sys
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
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # tomli is tomllib before it joined the standard library
                import tomli as tomllib
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
    for key in ("budget", "budgets"):
        if not isinstance(document.get(key, []), list):
            raise ConfigurationError(f"{source}: key {key!r}: expected a list of budget "
                                     f"tables, got {type(document[key]).__name__}")
    entries: list[Any] = [*document.get("budget", []), *document.get("budgets", [])]
    budgets: list[Budget] = []
    presets = document.get("presets", [])
    if isinstance(presets, str):
        presets = [presets]
    if not isinstance(presets, list) or not all(isinstance(name, str) for name in presets):
        raise ConfigurationError(f"{source}: key 'presets': expected a list of preset names, "
                                 f"got {presets!r}")
    lines = _entry_lines(raw, path.suffix.lower() == ".json")
    for name in presets:
        try:
            budgets.extend(preset(name))
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: {exc}") from None
    for index, entry in enumerate(entries, 1):
        line = lines[index - 1] if len(lines) == len(entries) else None
        budgets.append(parse_budget(entry, source=f"{source}, line {line}" if line else source,
                                    index=index))
    seen: set[str] = set()
    for budget in budgets:
        if budget.name in seen:
            raise ConfigurationError(f"{source}: budget {budget.name!r}, field 'name': "
                                     "defined twice")
        seen.add(budget.name)
    return budgets



_TABLE_HEADER = re.compile(rb"^[ \t]*\[\[[ \t]*(budgets?)[ \t]*\]\]", re.MULTILINE)


def _entry_lines(raw: bytes, is_json: bool) -> list[int]:
    """The line of each ``[[budget]]`` table of a TOML file, in order, so an error names
    the line its budget starts on (JSON: none; the budget's name or number says where)."""
    if is_json:
        return []
    headers = list(_TABLE_HEADER.finditer(raw))
    if len({match.group(1) for match in headers}) > 1:
        return []  # [[budget]] and [[budgets]] mixed: entries are not in file order
    return [raw.count(b"\n", 0, match.start()) + 1 for match in headers]
