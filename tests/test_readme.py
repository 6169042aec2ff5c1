"""Every README example marked ``readme-example`` runs as written, each in a fresh
interpreter (examples register global framework hooks, as user code does)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = re.compile(r"<!-- readme-example: (?P<name>[\w-]+) -->\s*```python\n(?P<code>.*?)```",
                     re.S)
EXAMPLES = {m["name"]: m["code"] for m in EXAMPLE.finditer(README.read_text(encoding="utf-8"))}


def test_readme_has_examples() -> None:
    assert {"quickstart", "langchain", "llamaindex"} <= set(EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(name: str, tmp_path: Path) -> None:
    script = tmp_path / f"{name}.py"
    script.write_text(EXAMPLES[name], encoding="utf-8")
    env = {**os.environ, "BUDGETKIT_DB": str(tmp_path / "default.db")}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "an example should show its result"
