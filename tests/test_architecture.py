"""The house rules of docs/architecture.md, checked on the code's own imports.

Every import counts: at module level, inside functions, under ``TYPE_CHECKING``. A failure
names the file, the line and the rule it breaks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "budgetkit"
INTEGRATIONS = ROOT / "integrations"

# Which floor each part of the core stands on. A module may import a part on a lower floor,
# or its own part; never one on its own floor or above (so budgets, cache and fitting stay
# independent of each other, and nothing below the engine knows the engine).
LAYERS: dict[str, int] = {
    "_version": 0, "errors": 0, "progress": 0,  # the progress hook's type, nothing else
    "pricing": 1,
    "ledger": 2,
    "budgets": 3, "cache": 3, "fitting": 3,
    "routing": 4,
    "engine": 5,
    "reports": 6,
    "__init__": 7,  # the top-level surface re-exports every layer below it
    "server": 8, "testing": 8,
    "cli": 9,
}

# The one arrow that runs up, on purpose: ``budgetkit demo`` is an application of the
# LangChain adapter (it shows the callback at work), imported lazily when the command runs.
ALLOWED_UPWARD = {("budgetkit/cli/_demo.py", framework)
                  for framework in ("langchain_budgetkit", "langchain_core", "langchain_openai")}


# Not source: tests, and the copies a non-editable ``pip install ./integrations/...`` leaves
# in ``build/`` (stale code the rules would judge instead of the package's own).
_NOT_SOURCE = {"tests", "build", "dist"}


def _python_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*.py")):
        if _NOT_SOURCE.isdisjoint(path.relative_to(folder).parts):
            yield path


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module) for every import in ``path``, relative ones resolved."""
    package = path.relative_to(ROOT).with_suffix("").parts
    if package[0] == "integrations":
        package = package[2:]
    package = package[:-1]  # the module's own package (an __init__ is its package's too)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # ``from budgetkit.x import _y`` imports module _y
                if alias.name.startswith("_") and alias.name != "__version__":
                    yield node.lineno, f"{module}.{alias.name}"


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "budgetkit":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _own_part(path: Path) -> str:
    relative = path.relative_to(CORE).parts
    return relative[0].removesuffix(".py") if len(relative) > 1 or relative[0] != "__init__.py" \
        else "__init__"


def test_every_part_of_the_core_has_a_floor() -> None:
    parts = {_own_part(path) for path in _python_files(CORE)}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


def test_core_imports_point_down_only() -> None:
    wrong = []
    for path in _python_files(CORE):
        own = _own_part(path)
        rel = path.relative_to(ROOT).as_posix()
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in ("langchain_budgetkit", "llama_index", "langchain_core", "langchain",
                       "langchain_openai"):
                if (rel, top) not in ALLOWED_UPWARD:
                    wrong.append(f"{rel}:{line} imports the framework module {module}")
                continue
            part = _part(module)
            if part is None or part == own:
                continue
            if LAYERS[part] >= LAYERS[own]:
                wrong.append(f"{rel}:{line} ({own}, floor {LAYERS[own]}) imports {module} "
                             f"({part}, floor {LAYERS[part]})")
    assert not wrong, "\n".join(wrong)


def test_no_private_import_across_packages() -> None:
    """Between parts of the core, and from the integrations, only public names are used:
    ``budgetkit``, ``budgetkit.<package>`` and its public modules."""
    wrong = []
    files = [*_python_files(CORE), *_python_files(INTEGRATIONS)]
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        own = _own_part(path) if path.is_relative_to(CORE) else None
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] == "budgetkit":
                if _part(module) == own or module == "budgetkit._version":
                    continue
                private = [p for p in parts[1:] if p.startswith("_")]
            elif parts[:2] == ["llama_index", "callbacks"] and not rel.startswith(
                    "integrations/llama-index-callbacks-budgetkit/"):
                private = [p for p in parts[2:] if p.startswith("_")]
            else:
                continue
            if private:
                wrong.append(f"{rel}:{line} imports the private {module}")
    assert not wrong, "\n".join(wrong)


def test_integration_tests_use_only_public_names_of_the_core() -> None:
    """The integrations' tests too: what they need of the core is what their users get."""
    files = [path for package in INTEGRATIONS.iterdir() if (package / "tests").is_dir()
             for path in sorted((package / "tests").rglob("*.py"))]
    assert files
    wrong = [f"{path.relative_to(ROOT).as_posix()}:{line} imports the private {module}"
             for path in files for line, module in _imports(path)
             if module.split(".")[0] == "budgetkit"
             and any(p.startswith("_") for p in module.split(".")[1:])
             and module != "budgetkit._version"]
    assert not wrong, "\n".join(wrong)


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    modules = {}
    for path in _python_files(CORE):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    for name, path in modules.items():
        targets = set()
        for _, module in _imports(path):
            # an import of a.b.c also runs a and a.b: the closest known module is the target
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name:
                targets.add(module)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_between_modules() -> None:
    # A package's __init__ imports its own modules, and they import siblings by their
    # module path, never through the __init__: so a circle here is a real one.
    graph = _module_graph()
    for name, targets in graph.items():
        package = name.rpartition(".")[0]
        if not name.endswith(tuple(f".{p}" for p in LAYERS)) or name == "budgetkit":
            graph[name] = {t for t in targets if t != package}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The core's modules and the integrations' package modules (their tests aside).
SIZED_MODULES = [*_python_files(CORE), *_python_files(INTEGRATIONS)]


def test_the_size_rule_covers_the_core_and_every_integration() -> None:
    folders = {path.relative_to(ROOT).parts[:2] for path in SIZED_MODULES}
    expected = {("budgetkit", path.name) for path in CORE.iterdir()
                if path.is_dir() and (path / "__init__.py").exists()}
    expected |= {("integrations", path.name) for path in INTEGRATIONS.iterdir()
                 if (path / "pyproject.toml").exists()}
    assert expected <= folders, sorted(expected - folders)
    assert not [path for path in SIZED_MODULES if "tests" in path.relative_to(ROOT).parts]


@pytest.mark.parametrize("path", SIZED_MODULES,
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_over_500_lines_without_a_reason(path: Path) -> None:
    text = path.read_text()
    if text.count("\n") > 500:
        head = text[:3000]
        assert "Over 500 lines because" in head, (
            f"{path.relative_to(ROOT)} has {text.count(chr(10))} lines and no reason at its top")
