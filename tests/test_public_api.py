"""The public surface: curated exports, fast import, no framework loaded by the core."""

from __future__ import annotations

import subprocess
import sys

import budgetkit


def test_every_exported_name_resolves() -> None:
    for name in budgetkit.__all__:
        assert getattr(budgetkit, name) is not None, name


def test_exported_objects_live_in_private_modules() -> None:
    for name in budgetkit.__all__:
        if name == "__version__":
            continue
        module = getattr(getattr(budgetkit, name), "__module__", "budgetkit._x")
        assert module.startswith("budgetkit._"), (name, module)


def test_unknown_attribute_raises_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError):
        budgetkit.NoSuchThing  # noqa: B018


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_import_and_pricing_load_no_framework_and_no_database_layer() -> None:
    loaded = _run(
        "import sys, budgetkit\n"
        "budgetkit.estimate_cost('gpt-4o', 10, 5)\n"
        "budgetkit.count_tokens('hello', 'gpt-4o')\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'langchain_core', 'langchain', 'llama_index', 'sqlmodel', 'sqlalchemy'})))")
    assert loaded == ""


def test_engine_loads_no_framework() -> None:
    loaded = _run(
        "import sys, budgetkit\n"
        "e = budgetkit.Engine(':memory:'); e.close()\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'langchain_core', 'langchain', 'llama_index'})))")
    assert loaded == ""
