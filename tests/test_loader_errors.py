"""Malformed budget files and price catalogs: each mistake is a typed error naming the
file, the budget or model (and, for TOML budget files, the line), the field, and what was
expected; and nothing of the file is loaded (engine budgets and catalog entries are as
before). Table-driven: one row per mistake.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from budgetkit import Budget, BudgetLevels, ConfigurationError, Engine, PriceCatalog
from budgetkit.budgets import load_budgets
from budgetkit.errors import CatalogError
from budgetkit.pricing import default_catalog

GOOD_BUDGET = '[[budget]]\nname = "good"\nlimit = 1.0\n\n'

# (id, TOML text after one good budget, words the message must hold)
TOML_CASES: list[tuple[str, str, list[str]]] = [
    ("critical-above-limit", '[[budget]]\nname = "b"\nlimit = 10.0\nlevels = {critical = 1.5}\n',
     ["'b'", "levels.critical", "above the limit", "150%", "line 5"]),
    ("critical-absolute-above-limit",
     '[[budget]]\nname = "b"\nlimit = 1000\nunit = "tokens"\n'
     'levels = {critical = 5000, absolute = true}\n',
     ["'b'", "levels.critical", "above the limit"]),
    ("downgrade-not-a-number", '[[budget]]\nname = "b"\nlimit = 1.0\ndowngrade_below = "lots"\n',
     ["'b'", "downgrade_below", "fraction in [0, 1]", "'lots'"]),
    ("downgrade-over-one", '[[budget]]\nname = "b"\nlimit = 1.0\ndowngrade_below = 1.5\n',
     ["downgrade_below", "fraction"]),
    ("limit-nan", '[[budget]]\nname = "b"\nlimit = nan\n', ["'b'", "limit", "positive"]),
    ("limit-inf", '[[budget]]\nname = "b"\nlimit = inf\n', ["limit", "positive"]),
    ("limit-string", '[[budget]]\nname = "b"\nlimit = "ten"\n', ["limit", "'ten'"]),
    ("limit-missing", '[[budget]]\nname = "b"\n', ["'b'", "limit", "missing"]),
    ("alert-at-nan", '[[budget]]\nname = "b"\nlimit = 1.0\nalert_at = [0.5, nan]\n',
     ["alert_at", "positive fractions"]),
    ("alert-at-string", '[[budget]]\nname = "b"\nlimit = 1.0\nalert_at = "half"\n',
     ["alert_at", "list"]),
    ("unknown-field", '[[budget]]\nname = "b"\nlimit = 1.0\nlimt = 2\n',
     ["'b'", "'limt'", "unknown field"]),
    ("unknown-scope", '[[budget]]\nname = "b"\nlimit = 1.0\nscope = "team"\n',
     ["scope", "'team'", "global"]),
    ("unknown-period", '[[budget]]\nname = "b"\nlimit = 1.0\nperiod = "fortnight"\n',
     ["period", "'fortnight'"]),
    ("unknown-timezone", '[[budget]]\nname = "b"\nlimit = 1.0\ntimezone = "Mars/Olympus"\n',
     ["timezone", "Mars/Olympus"]),
    ("levels-not-rising",
     '[[budget]]\nname = "b"\nlimit = 1.0\nlevels = {moderate = 0.9, high = 0.5}\n',
     ["levels", "moderate <= high <= critical"]),
    ("levels-unknown", '[[budget]]\nname = "b"\nlimit = 1.0\nlevels = {severe = 0.9}\n',
     ["levels.severe", "moderate, high, critical"]),
    ("levels-absolute-not-bool",
     '[[budget]]\nname = "b"\nlimit = 1.0\nlevels = {high = 0.5, absolute = "yes"}\n',
     ["levels.absolute", "true or false"]),
    ("require-approval-string", '[[budget]]\nname = "b"\nlimit = 1.0\nrequire_approval = "no"\n',
     ["require_approval", "true or false"]),
    ("exclude-numbers", '[[budget]]\nname = "b"\nlimit = 1.0\nscope = "user"\nexclude = [1, 2]\n',
     ["exclude", "strings"]),
    ("budgets-not-a-list", 'budgets = 5\n', ["'budgets'", "list"]),
    ("presets-not-names", 'presets = [1]\n', ["'presets'", "preset names"]),
    ("unknown-preset", 'presets = ["nope"]\n', ["nope"]),
    ("unknown-top-level", 'budgest = []\n', ["'budgest'", "unknown top-level key"]),
    ("duplicate-name", '[[budget]]\nname = "good"\nlimit = 2.0\n', ["'good'", "defined twice"]),
    ("not-toml", '[[budget]\nname = "b"\n', ["not valid", "line"]),
]


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = Engine(db=str(tmp_path / "loaders.db"))
    eng.add_budget(Budget(limit=5.0, name="existing"))
    yield eng  # type: ignore[misc]
    eng.close()


def budget_names(engine: Engine) -> list[tuple[str, float]]:
    return sorted((b.name, b.limit) for b in engine.budgets())


@pytest.mark.parametrize("text, words", [(t, w) for _, t, w in TOML_CASES],
                         ids=[case for case, _, _ in TOML_CASES])
def test_a_malformed_toml_budget_file_is_refused_whole(tmp_path: Path, engine: Engine,
                                                       text: str, words: list[str]) -> None:
    path = tmp_path / "budgets.toml"
    # (top-level keys must come before the first table in TOML)
    path.write_text(GOOD_BUDGET + text if text.startswith("[[") else text + GOOD_BUDGET,
                    encoding="utf-8")
    before = budget_names(engine)
    with pytest.raises(ConfigurationError) as info:
        engine.load_budgets(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)
    assert budget_names(engine) == before  # the good budget before the bad one is not added


JSON_CASES: list[tuple[str, Any, list[str]]] = [
    ("critical-above-limit", {"budgets": [{"name": "j", "limit": 2, "levels": {"critical": 1.5}}]},
     ["'j'", "levels.critical", "above the limit"]),
    ("limit-nan-literal", '{"budgets": [{"name": "j", "limit": NaN}]}', ["'j'", "limit"]),
    ("entry-not-object", {"budgets": [{"name": "ok", "limit": 1}, 5]},
     ["#2", "table/object"]),
    ("levels-not-table", {"budgets": [{"name": "j", "limit": 1, "levels": [0.5]}]},
     ["levels", "table"]),
    ("not-json", '{"budgets": [', ["not valid json"]),
]


@pytest.mark.parametrize("document, words", [(d, w) for _, d, w in JSON_CASES],
                         ids=[case for case, _, _ in JSON_CASES])
def test_a_malformed_json_budget_file_is_refused_whole(tmp_path: Path, engine: Engine,
                                                       document: Any, words: list[str]) -> None:
    path = tmp_path / "budgets.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document),
                    encoding="utf-8")
    before = budget_names(engine)
    with pytest.raises(ConfigurationError) as info:
        engine.load_budgets(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert budget_names(engine) == before


def test_critical_at_or_below_the_limit_still_loads_and_stops_there(tmp_path: Path) -> None:
    path = tmp_path / "budgets.toml"
    path.write_text('[[budget]]\nname = "b"\nlimit = 10.0\nlevels = {critical = 1.0}\n'
                    '[[budget]]\nname = "c"\nlimit = 10.0\nlevels = {critical = 0.9}\n',
                    encoding="utf-8")
    exact, lower = load_budgets(path)
    assert exact.stop_amount == exact.limit_amount
    assert lower.stop_amount == int(lower.limit_amount * 0.9)
    with pytest.raises(ConfigurationError, match="levels.critical"):
        Budget(limit=1.0, levels=BudgetLevels(critical=1.01))


# -- price catalogs ---------------------------------------------------------------------------
GOOD_MODEL = {"name": "good-model", "provider": "acme", "mode": "chat", "input_per_mtok": "1",
              "output_per_mtok": "2", "context_window": 1000}


def bad_model(**changes: Any) -> dict[str, Any]:
    entry = {**GOOD_MODEL, "name": "bad-model", **changes}
    return {key: value for key, value in entry.items() if value is not None}


CATALOG_CASES: list[tuple[str, Any, list[str]]] = [
    ("price-not-a-number", bad_model(input_per_mtok="cheap"), ["bad-model", "input_per_mtok",
                                                               "'cheap'"]),
    ("price-negative", bad_model(output_per_mtok=-1), ["bad-model", "output_per_mtok", ">= 0"]),
    ("price-nan", bad_model(output_per_mtok="NaN"), ["output_per_mtok", "finite"]),
    ("price-missing", bad_model(input_per_mtok=None), ["bad-model", "input_per_mtok",
                                                       "missing"]),
    ("price-bool", bad_model(input_per_mtok=True), ["input_per_mtok", "decimal string or number"]),
    ("window-negative", bad_model(context_window=-5), ["context_window", "whole number"]),
    ("window-float", bad_model(context_window=1.5), ["context_window", "whole number"]),
    ("mode-unknown", bad_model(mode="image"), ["mode", "'image'", "chat"]),
    ("tokenizer-unknown", bad_model(tokenizer="sentencepiece"), ["tokenizer"]),
    ("aliases-not-strings", bad_model(aliases=[1]), ["aliases", "list of strings"]),
    ("date-malformed", bad_model(source_date="yesterday"), ["source_date", "YYYY-MM-DD"]),
    ("name-missing", {k: v for k, v in GOOD_MODEL.items() if k != "name"}, ["#1", "name"]),
    ("entry-not-object", "gpt-5", ["#1", "object"]),
    ("duplicate", dict(GOOD_MODEL), ["good-model", "duplicate"]),
]


@pytest.mark.parametrize("entry, words", [(e, w) for _, e, w in CATALOG_CASES],
                         ids=[case for case, _, _ in CATALOG_CASES])
def test_a_malformed_price_file_is_refused_whole(tmp_path: Path, entry: Any,
                                                 words: list[str]) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": [GOOD_MODEL, entry]}), encoding="utf-8")
    catalog = default_catalog().copy()
    size = len(catalog)
    with pytest.raises(CatalogError) as info:
        catalog.load_file(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)
    assert len(catalog) == size and "good-model" not in catalog


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe{", ["not UTF-8"]), (b'{"models": 5}', ["'models' list"]),
    (b'{"models": [', ["invalid JSON at line 1"]),
], ids=["binary", "models-not-list", "truncated"])
def test_an_unreadable_price_file_names_the_file(tmp_path: Path, content: bytes,
                                                 words: list[str]) -> None:
    path = tmp_path / "prices.json"
    path.write_bytes(content)
    with pytest.raises(CatalogError) as info:
        PriceCatalog().load_file(path)
    for word in [str(path), *words]:
        assert word in str(info.value)


LITELLM_GOOD = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
                "litellm_provider": "acme", "mode": "chat", "max_input_tokens": 1000}

LITELLM_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("price-not-a-number", {"input_cost_per_token": "abc"},
     ["bad-model", "input_cost_per_token", "'abc'", "must be a number"]),
    ("output-not-a-number", {"output_cost_per_token": "1e-6x"},
     ["output_cost_per_token", "'1e-6x'"]),
    ("cache-read-a-list", {"cache_read_input_token_cost": [1]},
     ["cache_read_input_token_cost", "[1]"]),
    ("price-negative", {"input_cost_per_token": -1e-6}, ["input_cost_per_token", ">= 0"]),
    ("price-nan", {"output_cost_per_token": float("nan")}, ["output_cost_per_token", "nan"]),
    ("price-too-fine", {"input_cost_per_token": 1e-30}, ["input_cost_per_token", "finer"]),
    ("max-input-string", {"max_input_tokens": "lots"}, ["max_input_tokens", "'lots'"]),
    ("max-output-negative", {"max_output_tokens": -3}, ["max_output_tokens", "whole number"]),
]


@pytest.mark.parametrize("changes, words", [(c, w) for _, c, w in LITELLM_CASES],
                         ids=[case for case, _, _ in LITELLM_CASES])
def test_a_malformed_litellm_file_names_model_and_field(tmp_path: Path, changes: dict[str, Any],
                                                        words: list[str]) -> None:
    data = {"good-model": LITELLM_GOOD, "bad-model": {**LITELLM_GOOD, **changes}}
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(data), encoding="utf-8")  # (json writes NaN as NaN)
    catalog = default_catalog().copy()
    size = len(catalog)
    with pytest.raises(CatalogError) as info:
        catalog.load_litellm(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)
    assert len(catalog) == size and "good-model" not in catalog
