"""Typing: mypy, configured in pyproject.toml ([tool.mypy]), finds no error in the core
(strict) nor in the three integrations (every function annotated and checked).

One mypy run checks the four packages: they import each other, so one run reads each module
once. Each package's test then fails with mypy's own lines about that package. mypy keeps
its cache in the repository's .mypy_cache (git-ignored): a repeated run takes seconds, a
first run in a fresh environment about a minute.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomli is tomllib before it joined the standard library
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"

# package checked -> the folder its files are reported under
PACKAGES = {
    "budgetkit": "budgetkit/",
    "langchain_budgetkit": "integrations/langchain-budgetkit/",
    "llama_index.callbacks.budgetkit": "integrations/llama-index-callbacks-budgetkit/",
    "llama_index.llms.budgetkit": "integrations/llama-index-llms-budgetkit/",
}
# mypy's report lines: "path:line: error: message  [code]" (notes and the summary aside)
_ERROR = re.compile(r"^(?P<path>[^:\n]+):\d+(?::\d+)?: error: ", re.MULTILINE)

pytestmark = pytest.mark.slow


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--no-color-output",
         "--no-error-summary", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def mypy_run() -> subprocess.CompletedProcess[str]:
    # The packages are named here (not taken from the config's `packages`), so a package
    # mypy cannot find fails the run instead of going unchecked.
    targets = [arg for package in PACKAGES for arg in ("-p", package)]
    return _mypy(*targets)


def _errors_under(output: str, folder: str) -> list[str]:
    return [line for line in output.splitlines()
            if (match := _ERROR.match(line))
            and match["path"].replace("\\", "/").startswith(folder)]


def test_mypy_ran_and_every_error_is_attributed(mypy_run: subprocess.CompletedProcess[str]
                                                ) -> None:
    # exit 0: no error; 1: errors (each one reported below, under its package); anything
    # else is mypy failing to run (a bad configuration, a package it cannot find, a crash)
    assert mypy_run.returncode in (0, 1), mypy_run.stdout + mypy_run.stderr
    output = mypy_run.stdout
    stray = [line for line in output.splitlines()
             if _ERROR.match(line) and not any(_errors_under(line, folder)
                                               for folder in PACKAGES.values())]
    assert not stray, "mypy errors outside the checked packages:\n" + "\n".join(stray)
    assert (mypy_run.returncode == 0) == (not _ERROR.search(output)), output


@pytest.mark.parametrize("package", list(PACKAGES))
def test_package_has_no_mypy_error(mypy_run: subprocess.CompletedProcess[str],
                                   package: str) -> None:
    errors = _errors_under(mypy_run.stdout, PACKAGES[package])
    assert not errors, (f"mypy (pyproject.toml config) reports {len(errors)} error(s) in "
                        f"{package}; run `mypy` from the repository root:\n"
                        + "\n".join(errors))


def test_the_core_is_strict_and_the_integrations_are_checked() -> None:
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["mypy"]
    assert config["strict"] is True
    for override in config.get("overrides", []):
        modules = override["module"]
        modules = [modules] if isinstance(modules, str) else modules
        if any(module == "budgetkit" or module.startswith("budgetkit.") for module in modules):
            raise AssertionError(f"the core must stay strict, but an override relaxes it: "
                                 f"{override}")
        # the integrations may relax the flags about Any, never annotation or checking
        for kept in ("check_untyped_defs", "disallow_untyped_defs",
                     "disallow_incomplete_defs", "ignore_errors"):
            value = override.get(kept)
            assert value is None or value is (kept != "ignore_errors"), (kept, override)


def test_the_configuration_rejects_what_strict_rejects(tmp_path: Path) -> None:
    # The same configuration on a throwaway module: an unannotated function and a call
    # returning Any from a typed one are errors, as they are in budgetkit/.
    probe = tmp_path / "typing_probe.py"
    probe.write_text("import json\n\n\ndef untyped(x):\n    return x\n\n\n"
                     "def parsed(text: str) -> int:\n    return json.loads(text)\n",
                     encoding="utf-8")
    result = _mypy("--cache-dir", str(tmp_path / "cache"), str(probe))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[no-untyped-def]" in result.stdout, result.stdout
    assert "[no-any-return]" in result.stdout, result.stdout
