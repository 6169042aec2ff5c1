"""The price catalog: what a token of each model costs, and how much a model can take.

The bundled file ``budgetkit/pricing/data/prices.json`` is validated on load. Users add or
override models in code (:meth:`PriceCatalog.register`), from their own file
(:meth:`PriceCatalog.load_file`), or from LiteLLM's ``model_prices_and_context_window.json``
(:meth:`PriceCatalog.load_litellm`). Names resolve as users write them: case, provider
prefixes (``openai/gpt-4o``) and dated snapshots (``gpt-4o-2024-08-06``) fall back to the
base model unless the snapshot has its own entry.

Over 500 lines because validation of the bundled file, user overrides and LiteLLM's
format share one row parser, kept beside the types it builds.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from budgetkit.errors import CatalogError, ConfigurationError, UnknownModelError

from ._counts import token_count
from ._money import PICOS_PER_NANO, nanos_to_usd, per_mtok_to_picos

__all__ = [
    "ModelPrice",
    "ModelBudget",
    "PriceCatalog",
    "default_catalog",
    "estimate_cost",
    "get_generation_budget",
    "get_embedding_budget",
]

logger = logging.getLogger("budgetkit")

Mode = Literal["chat", "completion", "embedding"]
_MODES = ("chat", "completion", "embedding")
_TOKENIZERS = ("o200k_base", "cl100k_base", "p50k_base", "r50k_base", "gpt2")
_BUNDLED = Path(__file__).with_name("data") / "prices.json"

# Date suffixes providers put on snapshots: -2024-08-06, -20240229, -0613, -1106, @20240229.
_SNAPSHOT_SUFFIX = re.compile(r"(?:[-@](?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})|-latest|-preview)$")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One catalog entry. Prices are integer pico-dollars per token (see ``_money``)."""

    name: str
    provider: str
    mode: Mode
    input_picos: int
    output_picos: int
    cached_input_picos: int | None = None
    cache_write_picos: int | None = None
    context_window: int = 0
    max_input_tokens: int = 0
    max_output_tokens: int | None = None
    batch_size: int | None = None
    tokenizer: str | None = None
    aliases: tuple[str, ...] = ()
    source: str = ""
    source_date: str = ""

    def cost_picos(self, input_tokens: int, output_tokens: int = 0, *,
                   cached_input_tokens: int = 0, cache_write_tokens: int = 0) -> int:
        """Exact cost in pico-dollars.

        ``input_tokens`` is the whole prompt, *including* cache reads and cache writes (the
        convention of LangChain's ``usage_metadata`` and OpenAI's ``prompt_tokens``): those
        parts are billed at their own rates and the rest at the input rate. Reasoning tokens
        are part of ``output_tokens`` and billed at the output rate, as providers bill them.
        """
        if not (type(input_tokens) is int and type(output_tokens) is int
                and type(cached_input_tokens) is int and type(cache_write_tokens) is int
                and input_tokens >= 0 and output_tokens >= 0 and cached_input_tokens >= 0
                and cache_write_tokens >= 0):  # NaN, inf, fractions, negatives: named
            input_tokens = token_count("input_tokens", input_tokens)
            output_tokens = token_count("output_tokens", output_tokens)
            cached_input_tokens = token_count("cached_input_tokens", cached_input_tokens)
            cache_write_tokens = token_count("cache_write_tokens", cache_write_tokens)
        if cached_input_tokens + cache_write_tokens > input_tokens:
            raise ConfigurationError(
                f"cached_input_tokens ({cached_input_tokens}) + cache_write_tokens "
                f"({cache_write_tokens}) exceed input_tokens ({input_tokens}); input_tokens "
                "must include them"
            )
        cached_rate = self.input_picos if self.cached_input_picos is None else self.cached_input_picos
        write_rate = self.input_picos if self.cache_write_picos is None else self.cache_write_picos
        plain = input_tokens - cached_input_tokens - cache_write_tokens
        return (plain * self.input_picos + cached_input_tokens * cached_rate
                + cache_write_tokens * write_rate + output_tokens * self.output_picos)

    def cost_nanos(self, input_tokens: int, output_tokens: int = 0, *,
                   cached_input_tokens: int = 0, cache_write_tokens: int = 0) -> int:
        """Cost in integer nano-dollars, rounded half-up once per call."""
        picos = self.cost_picos(input_tokens, output_tokens, cached_input_tokens=cached_input_tokens,
                                cache_write_tokens=cache_write_tokens)
        return (picos + PICOS_PER_NANO // 2) // PICOS_PER_NANO

    @property
    def input_cost_per_token(self) -> float:
        return self.input_picos / 1e12

    @property
    def output_cost_per_token(self) -> float:
        return self.output_picos / 1e12

    @property
    def has_local_tokenizer(self) -> bool:
        return self.tokenizer is not None


@dataclass(frozen=True, slots=True)
class ModelBudget:
    """Limits and prices of one model, as the Token Budget Management seed describes them."""

    model: str
    provider: str
    mode: Mode
    max_input_tokens: int
    max_context_window: int
    max_output_tokens: int | None
    recommended_batch_size: int | None
    cost_per_1k_input: float
    cost_per_1k_output: float
    cost_per_1k_cached_input: float | None

    @property
    def context_window(self) -> int:
        return self.max_context_window

    @property
    def is_free(self) -> bool:
        return self.cost_per_1k_input == 0 and self.cost_per_1k_output == 0


def _budget_of(price: ModelPrice) -> ModelBudget:
    def per_1k(picos: int) -> float:
        return picos * 1000 / 1e12

    return ModelBudget(
        model=price.name, provider=price.provider, mode=price.mode,
        max_input_tokens=price.max_input_tokens, max_context_window=price.context_window,
        max_output_tokens=price.max_output_tokens, recommended_batch_size=price.batch_size,
        cost_per_1k_input=per_1k(price.input_picos), cost_per_1k_output=per_1k(price.output_picos),
        cost_per_1k_cached_input=(None if price.cached_input_picos is None
                                  else per_1k(price.cached_input_picos)),
    )


# ---------------------------------------------------------------------------- parsing

_REQUIRED = ("name", "provider", "mode", "input_per_mtok", "output_per_mtok", "context_window")


def _price_field(raw: Mapping[str, Any], key: str, *, source: str, entry: str,
                 optional: bool = False) -> int | None:
    value = raw.get(key)
    if value is None:
        if optional:
            return None
        raise CatalogError("missing price", source=source, entry=entry, field=key)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise CatalogError(f"price must be a decimal string or number, got {value!r}",
                           source=source, entry=entry, field=key)
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise CatalogError(f"not a number: {value!r}", source=source, entry=entry,
                           field=key) from None
    if not amount.is_finite() or amount < 0:
        raise CatalogError(f"price must be a finite number >= 0, got {value!r}",
                           source=source, entry=entry, field=key)
    try:
        return per_mtok_to_picos(amount)
    except ValueError as exc:
        raise CatalogError(str(exc), source=source, entry=entry, field=key) from None


def _int_field(raw: Mapping[str, Any], key: str, *, source: str, entry: str,
               optional: bool = False, default: int | None = None) -> int | None:
    value = raw.get(key, default)
    if value is None:
        if optional:
            return None
        raise CatalogError("missing value", source=source, entry=entry, field=key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CatalogError(f"must be a whole number >= 0, got {value!r}", source=source,
                           entry=entry, field=key)
    return value


def parse_entry(raw: Any, *, source: str = "<code>", index: int | None = None) -> ModelPrice:
    """Validate one catalog entry (the bundled file's format) into a :class:`ModelPrice`.

    ``index`` (the entry's place in its file) names an entry that has no usable name."""
    number = f"#{index}" if index is not None else "?"
    if not isinstance(raw, Mapping):
        raise CatalogError(f"entry must be an object, got {type(raw).__name__}", source=source,
                           entry=number)
    entry = str(raw["name"]) if isinstance(raw.get("name"), str) and raw["name"] else number
    for key in _REQUIRED:
        if key not in raw:
            raise CatalogError("missing field", source=source, entry=entry, field=key)
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise CatalogError("name must be a non-empty string", source=source, entry=entry,
                           field="name")
    mode = raw["mode"]
    if mode not in _MODES:
        raise CatalogError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}",
                           source=source, entry=entry, field="mode")
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None and tokenizer not in _TOKENIZERS:
        raise CatalogError(f"tokenizer must be one of {', '.join(_TOKENIZERS)} or null, got "
                           f"{tokenizer!r}", source=source, entry=entry, field="tokenizer")
    aliases = raw.get("aliases") or ()
    if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) for a in aliases):
        raise CatalogError("aliases must be a list of strings", source=source, entry=entry,
                           field="aliases")
    source_date = raw.get("source_date") or ""
    if source_date:
        try:
            _dt.date.fromisoformat(source_date)
        except (TypeError, ValueError):
            raise CatalogError(f"not a YYYY-MM-DD date: {source_date!r}", source=source,
                               entry=entry, field="source_date") from None
    context_window = _int_field(raw, "context_window", source=source, entry=entry)
    assert context_window is not None
    return ModelPrice(
        name=name.strip().lower(),
        provider=str(raw["provider"]).lower(),
        mode=mode,
        input_picos=_price_field(raw, "input_per_mtok", source=source, entry=entry) or 0,
        output_picos=_price_field(raw, "output_per_mtok", source=source, entry=entry) or 0,
        cached_input_picos=_price_field(raw, "cached_input_per_mtok", source=source,
                                        entry=entry, optional=True),
        cache_write_picos=_price_field(raw, "cache_write_per_mtok", source=source, entry=entry,
                                       optional=True),
        context_window=context_window,
        max_input_tokens=_int_field(raw, "max_input_tokens", source=source, entry=entry,
                                    default=context_window) or context_window,
        max_output_tokens=_int_field(raw, "max_output_tokens", source=source, entry=entry,
                                     optional=True),
        batch_size=_int_field(raw, "batch_size", source=source, entry=entry, optional=True),
        tokenizer=tokenizer,
        aliases=tuple(a.strip().lower() for a in aliases),
        source=str(raw.get("source") or ""),
        source_date=source_date,
    )


# LiteLLM's field for each bundled-format field, so an error names the key in *their* file.
_LITELLM_FIELDS = {
    "input_per_mtok": "input_cost_per_token", "output_per_mtok": "output_cost_per_token",
    "cached_input_per_mtok": "cache_read_input_token_cost",
    "cache_write_per_mtok": "cache_creation_input_token_cost",
    "context_window": "max_input_tokens", "max_input_tokens": "max_input_tokens",
    "max_output_tokens": "max_output_tokens",
}


def _litellm_entry(name: str, raw: Mapping[str, Any], source: str) -> ModelPrice | None:
    """Convert one LiteLLM entry; ``None`` for entries that are not per-token priced."""
    mode = raw.get("mode", "chat")
    if not isinstance(mode, str) or mode not in _MODES or "input_cost_per_token" not in raw:
        return None

    def per_mtok(key: str) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise CatalogError(f"price per token must be a number, got {value!r}",
                               source=source, entry=name, field=key)
        try:
            return str(Decimal(str(value)) * 1_000_000)
        except InvalidOperation:
            raise CatalogError(f"price per token must be a number, got {value!r}",
                               source=source, entry=name, field=key) from None

    max_input = raw.get("max_input_tokens") or raw.get("max_tokens") or 0
    if isinstance(max_input, bool) or not isinstance(max_input, int):
        if isinstance(max_input, float) and max_input.is_integer():
            max_input = int(max_input)  # LiteLLM's file has a few 128000.0
        else:
            field = "max_input_tokens" if raw.get("max_input_tokens") else "max_tokens"
            raise CatalogError(f"must be a whole number of tokens, got {max_input!r}",
                               source=source, entry=name, field=field)
    try:
        return parse_entry({
            "name": name, "provider": raw.get("litellm_provider", "unknown"), "mode": mode,
            "input_per_mtok": per_mtok("input_cost_per_token"),
            "output_per_mtok": per_mtok("output_cost_per_token") or "0",
            "cached_input_per_mtok": per_mtok("cache_read_input_token_cost"),
            "cache_write_per_mtok": per_mtok("cache_creation_input_token_cost"),
            "context_window": max_input, "max_input_tokens": max_input,
            "max_output_tokens": raw.get("max_output_tokens"), "tokenizer": None,
            "source": f"LiteLLM price file {source}",
        }, source=source)
    except CatalogError as exc:
        if exc.field not in _LITELLM_FIELDS:
            raise
        # "got '5e-6000000'" (per million) would confuse: show LiteLLM's own value.
        key = _LITELLM_FIELDS[exc.field]
        expected = ("a finite price >= 0 (USD per token)" if key.endswith("cost")
                    or key.endswith("per_token") else "a whole number of tokens >= 0")
        reason = str(exc).split(": ", 1)[-1]
        raise CatalogError(f"must be {expected}, got {raw.get(key)!r} ({reason})",
                           source=source, entry=name, field=key) from None


# ---------------------------------------------------------------------------- catalog

@dataclass
class _Index:
    prices: dict[str, ModelPrice] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # every lowercase name/alias → entry


class PriceCatalog:
    """Model prices and limits, with name resolution and user overrides.

    ``fallback`` (a :class:`ModelPrice` or a model name in the catalog) prices models the
    catalog does not know instead of raising :class:`UnknownModelError`; each unknown name
    is logged once.
    """

    def __init__(self, entries: Iterable[ModelPrice] = (), *,
                 fallback: ModelPrice | str | None = None) -> None:
        self._lock = threading.Lock()
        self._index = _Index()
        self._resolved: dict[str, ModelPrice | None] = {}
        self._warned: set[str] = set()
        for entry in entries:
            self._add(entry)
        self.fallback = fallback

    # -- construction ---------------------------------------------------------------
    @classmethod
    def bundled(cls, *, fallback: ModelPrice | str | None = None) -> PriceCatalog:
        """A catalog holding the bundled price file."""
        return cls(_load_entries(_BUNDLED), fallback=fallback)

    def copy(self) -> PriceCatalog:
        return PriceCatalog(self._index.prices.values(), fallback=self._fallback)

    @property
    def fallback(self) -> ModelPrice | None:
        return self._fallback

    @fallback.setter
    def fallback(self, value: ModelPrice | str | None) -> None:
        self._fallback = self.get(value) if isinstance(value, str) else value

    def register(self, entry: ModelPrice | Mapping[str, Any]) -> ModelPrice:
        """Add or replace a model. Accepts a :class:`ModelPrice` or a bundled-format dict."""
        price = entry if isinstance(entry, ModelPrice) else parse_entry(entry)
        with self._lock:
            self._add(price)
        return price

    def load_file(self, path: str | Path) -> list[ModelPrice]:
        """Add or override models from a JSON file in the bundled format."""
        entries = _load_entries(Path(path))
        with self._lock:
            for entry in entries:
                self._add(entry)
        return entries

    def load_litellm(self, source: str | Path | Mapping[str, Any]) -> list[ModelPrice]:
        """Add models from LiteLLM's ``model_prices_and_context_window.json`` (path or dict).

        Entries without per-token prices (images, audio seconds) are skipped.
        """
        label = "<dict>" if isinstance(source, Mapping) else str(source)
        data = source if isinstance(source, Mapping) else _read_json(Path(source))
        if not isinstance(data, Mapping):
            raise CatalogError("LiteLLM price file must be a JSON object", source=label)
        added = []
        for name, raw in data.items():
            if name == "sample_spec" or not isinstance(raw, Mapping):
                continue
            price = _litellm_entry(name, raw, label)
            if price is not None:
                added.append(price)
        with self._lock:
            for price in added:
                self._add(price)
        return added

    def _add(self, price: ModelPrice) -> None:
        index = self._index
        old = index.prices.get(price.name)
        if old is not None:  # an override replaces the entry and its aliases
            for alias in old.aliases:
                if index.names.get(alias) == old.name:
                    del index.names[alias]
        index.prices[price.name] = price
        index.names[price.name] = price.name
        for alias in price.aliases:
            index.names[alias] = price.name
        self._resolved.clear()

    # -- lookup -----------------------------------------------------------------------
    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.resolve(model) is not None

    def __iter__(self) -> Iterator[ModelPrice]:
        return iter(list(self._index.prices.values()))

    def __len__(self) -> int:
        return len(self._index.prices)

    def resolve(self, model: str) -> ModelPrice | None:
        """The entry for ``model`` as a user writes it, or ``None``."""
        try:
            return self._resolved[model]
        except KeyError:
            pass
        found = self._resolve_uncached(model)
        self._resolved[model] = found
        return found

    def _resolve_uncached(self, model: str) -> ModelPrice | None:
        names = self._index.names
        key = model.strip().lower()
        candidates = [key]
        if "/" in key:  # provider prefixes: openai/gpt-4o, bedrock/anthropic.claude-...
            candidates.append(key.split("/", 1)[1])
            candidates.append(key.rsplit("/", 1)[1])
        if ":" in key:  # ollama-style tags, fine-tunes ft:gpt-4o-mini:org::id
            parts = [p for p in key.split(":") if p]
            candidates.extend(parts[1:2] if parts[0] == "ft" else parts[:1])
        for candidate in list(candidates):
            stripped = candidate
            while (shorter := _SNAPSHOT_SUFFIX.sub("", stripped)) != stripped:
                stripped = shorter
                candidates.append(stripped)
        for candidate in candidates:
            if candidate in names:
                return self._index.prices[names[candidate]]
        return None

    def get(self, model: str) -> ModelPrice:
        """The entry for ``model``; the fallback price or :class:`UnknownModelError`."""
        if not isinstance(model, str) or not model.strip():
            raise ConfigurationError(f"model must be a non-empty string, got {model!r}")
        price = self.resolve(model)
        if price is not None:
            return price
        if self._fallback is not None:
            if model not in self._warned:
                self._warned.add(model)
                logger.warning("budgetkit: model %r is not in the price catalog; pricing it "
                               "as %r (fallback)", model, self._fallback.name)
            return replace(self._fallback, name=model)
        raise UnknownModelError(model, self.suggest(model))

    def suggest(self, model: str, n: int = 3) -> list[str]:
        """The closest known names to ``model``."""
        return difflib.get_close_matches(model.strip().lower(), list(self._index.names), n=n,
                                         cutoff=0.5)

    # -- pricing --------------------------------------------------------------------
    def cost_nanos(self, model: str, input_tokens: int, output_tokens: int = 0, *,
                   cached_input_tokens: int = 0, cache_write_tokens: int = 0) -> int:
        return self.get(model).cost_nanos(input_tokens, output_tokens,
                                          cached_input_tokens=cached_input_tokens,
                                          cache_write_tokens=cache_write_tokens)

    def estimate_cost(self, model: str, input_tokens: int, output_tokens: int = 0, *,
                      cached_input_tokens: int = 0, cache_write_tokens: int = 0) -> float:
        """Cost of a call in USD."""
        return nanos_to_usd(self.cost_nanos(model, input_tokens, output_tokens,
                                            cached_input_tokens=cached_input_tokens,
                                            cache_write_tokens=cache_write_tokens))

    def budget(self, model: str, mode: Mode | None = None) -> ModelBudget:
        price = self.get(model)
        if mode == "embedding" and price.mode != "embedding":
            raise ConfigurationError(f"{model!r} is a {price.mode} model, not an embedding model")
        if mode in ("chat", "completion") and price.mode == "embedding":
            raise ConfigurationError(f"{model!r} is an embedding model, not a generation model")
        return _budget_of(price)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read: {exc.strerror}", source=str(path)) from None
    except json.JSONDecodeError as exc:
        raise CatalogError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                           source=str(path)) from None
    except UnicodeDecodeError as exc:
        raise CatalogError(f"not UTF-8 text (byte {exc.start}): expected a JSON file",
                           source=str(path)) from None


def _load_entries(path: Path) -> list[ModelPrice]:
    data = _read_json(path)
    models = data.get("models") if isinstance(data, Mapping) else data
    if not isinstance(models, list):
        raise CatalogError("expected an object with a 'models' list", source=str(path))
    entries, seen = [], set()
    for i, raw in enumerate(models):
        entry = parse_entry(raw, source=str(path), index=i)
        if entry.name in seen:
            raise CatalogError("duplicate model name", source=str(path), entry=entry.name,
                               field="name")
        seen.add(entry.name)
        entries.append(entry)
    return entries


_default: PriceCatalog | None = None
_default_lock = threading.Lock()


def default_catalog() -> PriceCatalog:
    """The bundled catalog, loaded once. Engines take their own copy, so overrides made on
    one engine never leak into another."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = PriceCatalog.bundled()
    return _default


def estimate_cost(model: str, input_tokens: int, output_tokens: int = 0, *,
                  cached_input_tokens: int = 0, cache_write_tokens: int = 0,
                  catalog: PriceCatalog | None = None) -> float:
    """Cost of a call in USD from the bundled catalog (or ``catalog``).

    >>> estimate_cost("gpt-4o-mini", input_tokens=1_000_000, output_tokens=0)
    0.15
    """
    return (catalog if catalog is not None else default_catalog()).estimate_cost(
        model, input_tokens, output_tokens, cached_input_tokens=cached_input_tokens,
        cache_write_tokens=cache_write_tokens)


def get_generation_budget(model: str, *, catalog: PriceCatalog | None = None) -> ModelBudget:
    """Limits and prices of a chat or completion model."""
    return (catalog if catalog is not None else default_catalog()).budget(model, "chat")


def get_embedding_budget(model: str, *, catalog: PriceCatalog | None = None) -> ModelBudget:
    """Limits, prices and recommended batch size of an embedding model."""
    return (catalog if catalog is not None else default_catalog()).budget(model, "embedding")
