"""Price catalog: bundled data, name resolution, exact pricing, overrides, errors."""

from __future__ import annotations

import json
import logging
from decimal import Decimal

import pytest

import budgetkit
from budgetkit import (CatalogError, ConfigurationError, PriceCatalog, UnknownModelError, estimate_cost)
from budgetkit.pricing import get_embedding_budget, get_generation_budget

SEED_MODELS = [
    "gpt-4-turbo", "gpt-4", "gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo",
    "text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002",
    "claude-3-opus-20240229", "claude-3-sonnet-20240229", "claude-3-haiku-20240307",
    "claude-3-5-sonnet-20241022", "claude-sonnet-4-20250514", "claude-opus-4-20250514",
    "embed-english-v3.0", "embed-multilingual-v3.0",
    "llama-3.3-70b-versatile", "llama-3.1-8b-instant",
    "intfloat/e5-small-v2", "intfloat/e5-base-v2", "intfloat/e5-large-v2",
    "BAAI/bge-small-en-v1.5", "BAAI/bge-base-en-v1.5", "BAAI/bge-large-en-v1.5",
    "gpt2", "meta-llama/Llama-2-7b-chat-hf", "mistralai/Mistral-7B-Instruct-v0.2",
    "gpt-4.1", "gpt-4.1-mini", "o3-mini", "gemini-2.5-pro", "gemini-2.5-flash",
]


@pytest.fixture(scope="module")
def catalog() -> PriceCatalog:
    return PriceCatalog.bundled()


@pytest.mark.parametrize("model", SEED_MODELS)
def test_bundled_catalog_covers_seed_models(catalog: PriceCatalog, model: str) -> None:
    price = catalog.get(model)
    assert price.context_window > 0
    assert price.source_date, f"{model} has no source date"


def test_every_entry_is_consistent(catalog: PriceCatalog) -> None:
    assert len(catalog) >= 90
    for price in catalog:
        assert price.mode in ("chat", "completion", "embedding")
        if price.cached_input_picos is not None:
            assert price.cached_input_picos <= price.input_picos, price.name
        if price.mode == "embedding":
            assert price.output_picos == 0 and price.max_output_tokens is None, price.name
        if price.provider == "huggingface":
            assert price.input_picos == price.output_picos == 0, price.name


def test_local_models_are_free() -> None:
    assert estimate_cost("intfloat/e5-small-v2", 1_000_000) == 0.0
    assert get_embedding_budget("BAAI/bge-base-en-v1.5").is_free


@pytest.mark.parametrize(("written", "canonical"), [
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("openai/gpt-4o", "gpt-4o"),
    ("GPT-4o-Mini", "gpt-4o-mini"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("azure/gpt-4o-mini", "gpt-4o-mini"),
    ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "gpt-4o-mini"),
    ("anthropic/claude-3-5-sonnet-latest", "claude-3-5-sonnet-20241022"),
    ("groq/llama-3.1-8b-instant", "llama-3.1-8b-instant"),
])
def test_names_resolve_as_users_write_them(catalog: PriceCatalog, written: str,
                                           canonical: str) -> None:
    assert catalog.get(written).name == canonical


def test_snapshot_with_its_own_price_is_not_folded_into_the_base(catalog: PriceCatalog) -> None:
    assert catalog.get("gpt-4o-2024-05-13").input_picos > catalog.get("gpt-4o").input_picos


def test_prices_are_exact_integers() -> None:
    # gpt-4o: $2.50 / 1M input, $10 / 1M output, $1.25 / 1M cached input.
    cost = estimate_cost("gpt-4o", 1_000_000, 1_000_000)
    assert cost == 12.5
    # Sum of a million tiny calls equals one big call exactly: no float drift.
    catalog = PriceCatalog.bundled()
    per_call = catalog.cost_nanos("gpt-4o-mini", 7, 3)
    assert per_call * 1_000_000 == catalog.cost_nanos("gpt-4o-mini", 7_000_000, 3_000_000)


def test_cached_and_cache_write_tokens_are_billed_at_their_own_rates(catalog: PriceCatalog) -> None:
    price = catalog.get("claude-3-5-sonnet-20241022")
    assert price.cached_input_picos is not None and price.cache_write_picos is not None
    nanos = price.cost_nanos(10_000, 500, cached_input_tokens=6_000, cache_write_tokens=2_000)
    expected_picos = (2_000 * price.input_picos + 6_000 * price.cached_input_picos
                      + 2_000 * price.cache_write_picos + 500 * price.output_picos)
    assert nanos == round(expected_picos / 1000)
    # The cached part is cheaper than billing it all as plain input.
    assert nanos < price.cost_nanos(10_000, 500)


def test_budgets_follow_the_seed_shape() -> None:
    budget = get_generation_budget("gpt-4-turbo")
    assert budget.max_context_window == 128_000
    assert budget.max_output_tokens == 4096
    assert budget.cost_per_1k_input == pytest.approx(0.01)
    emb = get_embedding_budget("text-embedding-3-small")
    assert emb.max_input_tokens == 8191 and emb.recommended_batch_size == 2048
    with pytest.raises(ConfigurationError, match="embedding model"):
        get_generation_budget("text-embedding-3-small")
    with pytest.raises(ConfigurationError, match="not an embedding model"):
        get_embedding_budget("gpt-4o")


def test_unknown_model_names_the_closest_known_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        estimate_cost("gpt-4oo", 10)
    assert info.value.model == "gpt-4oo"
    assert "gpt-4o" in info.value.suggestions
    assert "gpt-4o" in str(info.value)
    assert isinstance(info.value, budgetkit.BudgetkitError)


def test_fallback_price_logs_once_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    catalog = PriceCatalog.bundled(fallback="gpt-4o")
    with caplog.at_level(logging.WARNING, logger="budgetkit"):
        first = catalog.estimate_cost("my-private-model", 1_000_000)
        second = catalog.estimate_cost("my-private-model", 1_000_000)
    assert first == second == 2.5
    assert sum("my-private-model" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("tokens", [dict(input_tokens=-1), dict(input_tokens=1, output_tokens=-5),
                                    dict(input_tokens=1, cached_input_tokens=2)])
def test_bad_token_counts_are_rejected(tokens: dict[str, int]) -> None:
    with pytest.raises(ConfigurationError):
        estimate_cost("gpt-4o", **tokens)


def test_register_and_override_in_code() -> None:
    catalog = PriceCatalog.bundled()
    catalog.register({"name": "acme-llm", "provider": "acme", "mode": "chat",
                      "input_per_mtok": "1", "output_per_mtok": "2", "context_window": 8000,
                      "aliases": ["acme-llm-v1"]})
    assert catalog.estimate_cost("acme-llm-v1", 1_000_000, 1_000_000) == 3.0
    catalog.register({"name": "gpt-4o", "provider": "openai", "mode": "chat",
                      "input_per_mtok": "1", "output_per_mtok": "1", "context_window": 1000})
    assert catalog.estimate_cost("gpt-4o", 1_000_000) == 1.0
    # Overrides are per catalog: the shared bundled one is untouched.
    assert estimate_cost("gpt-4o", 1_000_000) == 2.5


def test_load_file_rejects_a_mistake_naming_file_entry_and_field(tmp_path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": [
        {"name": "good", "provider": "x", "mode": "chat", "input_per_mtok": "1",
         "output_per_mtok": "1", "context_window": 10},
        {"name": "broken", "provider": "x", "mode": "chat", "input_per_mtok": "-3",
         "output_per_mtok": "1", "context_window": 10},
    ]}))
    catalog = PriceCatalog.bundled()
    before = len(catalog)
    with pytest.raises(CatalogError) as info:
        catalog.load_file(path)
    message = str(info.value)
    assert str(path) in message and "'broken'" in message and "input_per_mtok" in message
    assert len(catalog) == before and "good" not in catalog  # nothing changed


@pytest.mark.parametrize(("entry", "field"), [
    ({"mode": "chat", "input_per_mtok": 1.0, "output_per_mtok": "x", "context_window": 1}, "output_per_mtok"),
    ({"mode": "video", "input_per_mtok": "1", "output_per_mtok": "1", "context_window": 1}, "mode"),
    ({"mode": "chat", "input_per_mtok": "1", "output_per_mtok": "1"}, "context_window"),
    ({"mode": "chat", "input_per_mtok": "1", "output_per_mtok": "1", "context_window": 1,
      "tokenizer": "bpe"}, "tokenizer"),
])
def test_malformed_entries_name_their_field(entry: dict, field: str) -> None:
    with pytest.raises(CatalogError, match=field):
        PriceCatalog().register({"name": "m", "provider": "p", **entry})


def test_malformed_json_file(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(CatalogError, match="invalid JSON at line 1"):
        PriceCatalog().load_file(path)


def test_load_litellm_price_file_format() -> None:
    catalog = PriceCatalog()
    added = catalog.load_litellm({
        "sample_spec": {"input_cost_per_token": 0},
        "my-model": {"litellm_provider": "openai", "mode": "chat", "max_input_tokens": 128000,
                     "max_output_tokens": 16384, "input_cost_per_token": 2.5e-06,
                     "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06},
        "dall-e-3": {"mode": "image_generation", "output_cost_per_image": 0.04},
    })
    assert [p.name for p in added] == ["my-model"]
    price = catalog.get("my-model")
    assert price.input_picos == 2_500_000 and price.cached_input_picos == 1_250_000
    assert catalog.estimate_cost("my-model", 1_000_000, 1_000_000) == 12.5


def test_prices_are_stored_as_decimal_strings_in_the_bundled_file() -> None:
    import importlib.resources

    raw = json.loads(importlib.resources.files("budgetkit").joinpath("pricing/data/prices.json").read_text())
    for entry in raw["models"]:
        assert isinstance(entry["input_per_mtok"], str), entry["name"]
        Decimal(entry["input_per_mtok"])
