"""Every README example marked ``readme-example`` runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = re.compile(r"<!-- readme-example: (?P<name>[\w-]+) -->\s*```python\n(?P<code>.*?)```",
                     re.S)
EXAMPLES = {m["name"]: m["code"] for m in EXAMPLE.finditer(README.read_text(encoding="utf-8"))}


def test_readme_has_examples() -> None:
    assert "quickstart" in EXAMPLES


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUDGETKIT_DB", str(tmp_path / "default.db"))
    exec(compile(EXAMPLES[name], f"README:{name}", "exec"), {"__name__": "__readme__"})
