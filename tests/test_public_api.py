"""The public surface: curated exports, fast import, no framework loaded by the core."""

from __future__ import annotations

import subprocess
import sys

import budgetkit


def test_every_exported_name_resolves() -> None:
    for name in budgetkit.__all__:
        assert getattr(budgetkit, name) is not None, name


# The top-level surface, as the README uses it. Adding or removing a name is a decision:
# change this list in the same commit (httpx's test_exported_members does the same).
EXPECTED_TOP_LEVEL = {
    "ApprovalRequired", "BudgetExceeded", "BudgetkitError", "CatalogError", "ConfigurationError",
    "ContextWindowExceeded", "StoreUnavailable", "UnknownModelError",
    "ModelPrice", "PriceCatalog", "count_message_tokens", "count_tokens", "count_tool_tokens",
    "default_catalog", "estimate_cost",
    "Engine", "UsageRow",
    "Alert", "Budget", "BudgetLevels", "BudgetStatus", "WebhookSink", "load_budgets",
    "model_token_budgets", "token_ladder_budgets",
    "CacheHit", "MiniLMEmbedder", "ResponseCache",
    "Cascade", "Fallback", "MinLength", "RouteDecision", "Router", "ValidJSON",
    "FitResult", "compress_prompt", "fit_documents", "fit_messages",
    "budget_report", "cost_analysis", "cost_series", "detect_anomalies", "export_usage",
    "forecast", "summarize", "what_if",
    "__version__",
}


def test_exported_members_are_the_documented_surface() -> None:
    assert set(budgetkit.__all__) == EXPECTED_TOP_LEVEL
    assert len(budgetkit.__all__) <= 50


def test_every_exported_name_is_documented() -> None:
    for name in budgetkit.__all__:
        if name == "__version__":
            continue
        assert (getattr(budgetkit, name).__doc__ or "").strip(), name


def test_exported_objects_live_in_private_modules_of_public_packages() -> None:
    for name in budgetkit.__all__:
        if name == "__version__":
            continue
        module = getattr(getattr(budgetkit, name), "__module__", "")
        parts = module.split(".")
        assert parts[0] == "budgetkit", (name, module)
        # budgetkit.errors is itself the public module of the exception tree
        assert module == "budgetkit.errors" or parts[-1].startswith("_"), (name, module)


def test_subpackage_surfaces_resolve_and_are_sorted_out_of_private_modules() -> None:
    import importlib

    for package in ("pricing", "ledger", "budgets", "cache", "routing", "fitting", "engine",
                    "reports", "server", "testing", "cli"):
        module = importlib.import_module(f"budgetkit.{package}")
        assert module.__doc__, package
        for name in module.__all__:
            assert getattr(module, name) is not None, (package, name)


def test_names_moved_off_the_top_level_still_work_with_a_warning() -> None:
    import pytest

    from budgetkit.budgets import Lanes

    with pytest.warns(DeprecationWarning, match="budgetkit.budgets.Lanes"):
        assert budgetkit.Lanes is Lanes


def test_integrations_export_their_surface() -> None:
    import langchain_budgetkit
    import llama_index.callbacks.budgetkit as li_callbacks
    import llama_index.llms.budgetkit as li_llms

    for module in (langchain_budgetkit, li_callbacks, li_llms):
        assert module.__version__
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)


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
