"""Pick a model per request from tiers the user names, and say why.

A :class:`Router` holds tiers ordered from cheapest to strongest, e.g.
``{"low": "gpt-4o-mini", "medium": "gpt-4.1-mini", "high": "gpt-4o"}``; each tier holds one
or more catalog model names. :meth:`Router.route` decides in this order:

1. an explicit model the caller requires (it must still fit its window);
2. the task type, using the Cost Optimization Reference's lists (``TASK_LEVELS``);
3. otherwise a complexity score of the prompt (length, code, reasoning cues, constraints);

then adjusts the tier:

4. budget pressure: when the remaining fraction of a budget that applies is below
   ``budget_threshold``, one tier down (the AI Cost Management seed's "estimated cost over
   the per-request limit → cheaper model");
5. low latency: the fastest tier;
6. context fit: if counted prompt + reserved output do not fit the chosen model's window,
   the cheapest model of any tier whose window fits; none fits → ContextWindowExceeded.

Every step that changed or fixed the choice adds a human-readable reason to the returned
:class:`RouteDecision`; adapters pass ``decision.reason`` to ``Engine.admit(route_reason=...)``
so the usage row says why that model ran. Routing is pure computation: no I/O except the
optional budget-headroom lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from budgetkit.errors import ConfigurationError, ContextWindowExceeded
from budgetkit.pricing import (
    ModelPrice,
    PriceCatalog,
    count_message_tokens,
    count_tokens,
    default_catalog,
)

__all__ = ["Router", "RouteDecision", "TASK_LEVELS", "complexity_score"]

#: Task type → level, from the Cost Optimization Reference's ModelRouter.
TASK_LEVELS: Mapping[str, str] = {
    "complex_reasoning": "high",
    "code_review": "high",
    "architecture_design": "high",
    "multi_step_analysis": "high",
    "code_generation": "medium",
    "summarization": "medium",
    "translation": "medium",
    "analysis": "medium",
}

HeadroomFn = Callable[..., "float | None"]


@dataclass(frozen=True)
class RouteDecision:
    """The model a request should use, the tier it came from, and why."""

    model: str
    tier: str | None
    reasons: tuple[str, ...]
    complexity: float | None = None
    input_tokens: int | None = None
    signals: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """The reasons as one line, the form ``Engine.admit(route_reason=...)`` stores."""
        return "; ".join(self.reasons)


# ----------------------------------------------------------------------- complexity

_CODE = re.compile(
    r"```|^\s*(?:def|class|import|from \S+ import|function|const|let|var|public|private|"
    r"#include|SELECT|CREATE TABLE)\b|[;{}]\s*$|=>|\w+\([^()]*\)\s*[{:]",
    re.MULTILINE | re.IGNORECASE)
_REASONING_CUES = re.compile(
    r"\b(?:why|prove|proof|derive|step[- ]by[- ]step|reason(?:ing)?|explain|analy[sz]e|"
    r"compare|trade-?offs?|evaluate|justify|design|architect\w*|optimi[sz]e|debug|"
    r"calculate|estimate|implications?|pros and cons|critique|plan)\b", re.IGNORECASE)
_CONSTRAINTS = re.compile(
    r"\b(?:must|should|shall|at least|at most|no more than|exactly|without|only|never|"
    r"always|ensure|required?|limit(?:ed)? to)\b|^\s*(?:[-*•]|\d+[.)])\s+",
    re.IGNORECASE | re.MULTILINE)

# Weights of each signal in the 0..1 score. Length saturates at LENGTH_SATURATION tokens.
_LENGTH_WEIGHT, _CODE_WEIGHT, _CUE_WEIGHT, _CONSTRAINT_WEIGHT = 0.35, 0.25, 0.1, 0.05
_CUE_CAP, _CONSTRAINT_CAP = 0.3, 0.2
LENGTH_SATURATION = 2_000


def complexity_score(text: str, *, tokens: int | None = None) -> tuple[float, dict[str, Any]]:
    """A 0..1 complexity estimate of a prompt and the signals behind it.

    Cheap heuristics, not a model: prompt length (saturating at 2,000 tokens), code,
    reasoning cues ("why", "prove", "step by step", "trade-offs", ...) and the number of
    constraints ("must", "at most", bullet points). ``tokens`` is the counted prompt length
    (the character count / 4 is used when not given).
    """
    if tokens is None:
        tokens = len(text) // 4
    cues = sorted({m.group(0).lower() for m in _REASONING_CUES.finditer(text)})
    constraints = len(_CONSTRAINTS.findall(text))
    has_code = bool(_CODE.search(text))
    score = (_LENGTH_WEIGHT * min(tokens / LENGTH_SATURATION, 1.0)
             + (_CODE_WEIGHT if has_code else 0.0)
             + min(_CUE_WEIGHT * len(cues), _CUE_CAP)
             + min(_CONSTRAINT_WEIGHT * constraints, _CONSTRAINT_CAP))
    signals = {"tokens": tokens, "code": has_code, "reasoning_cues": cues,
               "constraints": constraints}
    return round(min(score, 1.0), 4), signals


# ----------------------------------------------------------------------------- router

class Router:
    """Choose a model per request from named tiers, cheapest tier first.

    ``tiers`` maps a tier name to one model name or a list of them, in order from the
    cheapest tier to the strongest (dict order). Within a tier the cheapest model whose
    window fits is used. Every model must be in the catalog (``engine.catalog``, else
    ``catalog``, else the bundled one).

    ``levels`` maps the task levels "low" / "medium" / "high" to tier names when the tiers
    are named otherwise (default: same name if present, else the first, middle-rounded-down
    and last tier). ``complexity_thresholds`` are the scores at which "medium" and "high"
    start: by default code alone or two reasoning cues make a prompt "medium", code with
    reasoning cues and constraints "high" (on MT-Bench prompts the median score is 0.02
    and the 90th percentile 0.26; calibrate on your own traffic). ``budget_threshold`` is
    the remaining budget fraction below which the router goes one tier down; the fraction
    comes from ``headroom(model=, user_id=, project=, tags=, operation_type=)`` or, when not
    given, ``engine.budget_headroom`` if the engine has it. ``fastest_tier`` is used for
    ``low_latency`` requests (default: the first tier). ``default_max_output_tokens`` is the
    output reserved for the context-fit check when a request does not say.
    """

    def __init__(self, tiers: Mapping[str, str | Sequence[str]], *, engine: Any = None,
                 catalog: PriceCatalog | None = None,
                 levels: Mapping[str, str] | None = None,
                 task_levels: Mapping[str, str] = TASK_LEVELS,
                 complexity_thresholds: tuple[float, float] = (0.2, 0.45),
                 budget_threshold: float = 0.2,
                 headroom: HeadroomFn | None = None,
                 fastest_tier: str | None = None,
                 default_max_output_tokens: int = 1024) -> None:
        if not tiers:
            raise ConfigurationError("tiers must name at least one tier")
        self.engine = engine
        self.catalog = (catalog if catalog is not None
                        else engine.catalog if engine is not None else default_catalog())
        self.tiers: dict[str, tuple[str, ...]] = {}
        for name, models in tiers.items():
            names = (models,) if isinstance(models, str) else tuple(models)
            if not names or not all(isinstance(m, str) and m for m in names):
                raise ConfigurationError(
                    f"tier {name!r} must hold one or more model names, got {models!r}")
            for model in names:
                self.catalog.get(model)  # UnknownModelError names the model
            self.tiers[name] = names
        self.order: tuple[str, ...] = tuple(self.tiers)
        low, high = complexity_thresholds
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigurationError(
                "complexity_thresholds must satisfy 0 <= medium <= high <= 1, got "
                f"{complexity_thresholds}")
        self.complexity_thresholds = (low, high)
        if not 0.0 <= budget_threshold <= 1.0:
            raise ConfigurationError(
                f"budget_threshold must be within 0..1, got {budget_threshold}")
        self.budget_threshold = budget_threshold
        if fastest_tier is not None and fastest_tier not in self.tiers:
            raise ConfigurationError(
                f"fastest_tier {fastest_tier!r} is not a tier; tiers: {', '.join(self.order)}")
        self.fastest_tier = fastest_tier or self.order[0]
        if default_max_output_tokens < 0:
            raise ConfigurationError(
                f"default_max_output_tokens must be >= 0, got {default_max_output_tokens}")
        self.default_max_output_tokens = default_max_output_tokens
        self.levels = self._resolve_levels(levels)
        for task, level in task_levels.items():
            if level not in self.levels:
                raise ConfigurationError(
                    f"task type {task!r} maps to unknown level {level!r}; use low, medium or high")
        self.task_levels = dict(task_levels)
        self._headroom = headroom

    def _resolve_levels(self, levels: Mapping[str, str] | None) -> dict[str, str]:
        n = len(self.order)
        default = {"low": self.order[0], "medium": self.order[(n - 1) // 2],
                   "high": self.order[-1]}
        resolved = {level: (level if level in self.tiers else tier)
                    for level, tier in default.items()}
        for level, tier in (levels or {}).items():
            if level not in resolved:
                raise ConfigurationError(f"unknown level {level!r}; use low, medium or high")
            if tier not in self.tiers:
                raise ConfigurationError(
                    f"level {level!r} maps to unknown tier {tier!r}; tiers: "
                    f"{', '.join(self.order)}")
            resolved[level] = tier
        return resolved

    def calibrate(self, prompts: Iterable[str], *, high_share: float,
                  medium_share: float = 0.0) -> tuple[float, float]:
        """Set the complexity thresholds from a sample of your own prompts (no labels).

        Afterwards about ``high_share`` of prompts like these score "high" and the next
        ``medium_share`` "medium". Returns the new ``complexity_thresholds``. Ties in the
        scores can move slightly more prompts up than asked.
        """
        if not (0.0 <= high_share <= 1.0 and 0.0 <= medium_share <= 1.0
                and high_share + medium_share <= 1.0):
            raise ConfigurationError(
                f"high_share and medium_share must be within 0..1 and sum to <= 1, got "
                f"{high_share} and {medium_share}")
        counting_model = self.tiers[self.order[0]][0]
        scores = sorted(complexity_score(text, tokens=count_tokens(text, counting_model,
                                                                   catalog=self.catalog))[0]
                        for text in prompts)
        if not scores:
            raise ConfigurationError("calibrate needs at least one prompt")

        def quantile_above(share: float) -> float:
            if share <= 0.0:
                return 1.0 + 1e-9 if scores[-1] >= 1.0 else min(1.0, scores[-1] + 1e-9)
            return scores[min(len(scores) - 1, max(0, int((1.0 - share) * len(scores))))]

        high = quantile_above(high_share)
        medium = min(high, quantile_above(high_share + medium_share))
        self.complexity_thresholds = (min(medium, 1.0), min(high, 1.0))
        return self.complexity_thresholds

    # -- introspection ------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        """Every model of every tier, cheapest tier first, without repeats."""
        return list(dict.fromkeys(m for tier in self.order for m in self.tiers[tier]))

    def tier_of(self, model: str) -> str | None:
        return next((t for t in self.order if model in self.tiers[t]), None)

    # -- routing ------------------------------------------------------------------------
    def route(self, prompt: str | None = None, *,
              messages: Sequence[Mapping[str, Any]] | None = None,
              required_model: str | None = None, task_type: str | None = None,
              low_latency: bool = False, max_output_tokens: int | None = None,
              tools: Sequence[Mapping[str, Any]] | None = None,
              user_id: str | None = None, project: str | None = None,
              tags: Iterable[str] = (), operation_type: str | None = None) -> RouteDecision:
        """Decide which model serves this request.

        Give the prompt as text (``prompt``) or OpenAI-format ``messages``. Raises
        :class:`ContextWindowExceeded` when no model's window can take the prompt plus
        ``max_output_tokens``, and :class:`ConfigurationError` for bad arguments.
        """
        if prompt is not None and messages is not None:
            raise ConfigurationError("give prompt or messages, not both")
        if max_output_tokens is not None and max_output_tokens < 0:
            raise ConfigurationError(f"max_output_tokens must be >= 0, got {max_output_tokens}")
        reserve = self.default_max_output_tokens if max_output_tokens is None else max_output_tokens
        text = prompt if prompt is not None else _messages_text(messages or ())
        counter = _Counter(self.catalog, prompt, messages, tools)
        reasons: list[str] = []

        if required_model is not None:
            self.catalog.get(required_model)
            tokens = counter(required_model)
            self._check_fits(required_model, tokens, reserve)
            return RouteDecision(required_model, self.tier_of(required_model),
                                 (f"required model {required_model}",), input_tokens=tokens)

        score: float | None = None
        signals: dict[str, Any] = {}
        if task_type is not None and task_type in self.task_levels:
            level = self.task_levels[task_type]
            tier = self.levels[level]
            reasons.append(f"task type {task_type} -> {_level_tier(level, tier)}")
        else:
            score, signals = complexity_score(text, tokens=counter(self.tiers[self.order[0]][0]))
            level = ("high" if score >= self.complexity_thresholds[1]
                     else "medium" if score >= self.complexity_thresholds[0] else "low")
            tier = self.levels[level]
            prefix = f"task type {task_type} not in the table; " if task_type else ""
            reasons.append(f"{prefix}complexity {score:.2f} ({_describe(signals)}) -> "
                           f"{_level_tier(level, tier)}")

        tier = self._apply_budget_pressure(tier, reasons, user_id=user_id, project=project,
                                           tags=tuple(tags), operation_type=operation_type,
                                           counter=counter, reserve=reserve)
        if low_latency and tier != self.fastest_tier:
            tier = self.fastest_tier
            reasons.append(f"low latency -> fastest tier {tier}")

        model, tokens = self._fit(tier, counter, reserve, reasons)
        return RouteDecision(model, self.tier_of(model), tuple(reasons), complexity=score,
                             input_tokens=tokens, signals=signals)

    # -- steps ----------------------------------------------------------------------------
    def _apply_budget_pressure(self, tier: str, reasons: list[str], *, counter: _Counter,
                               reserve: int, **scope: Any) -> str:
        headroom_fn = self._headroom or getattr(self.engine, "budget_headroom", None)
        if headroom_fn is None:
            return tier
        model = self._cheapest_in(tier, counter, reserve)[0]
        headroom = headroom_fn(model=model, **scope)
        if headroom is None or headroom >= self.budget_threshold:
            return tier
        position = self.order.index(tier)
        if position == 0:
            reasons.append(f"budget headroom {headroom:.0%} < {self.budget_threshold:.0%} "
                           f"but already on the cheapest tier {tier}")
            return tier
        lower = self.order[position - 1]
        reasons.append(f"budget headroom {headroom:.0%} < {self.budget_threshold:.0%} -> "
                       f"one tier down to {lower}")
        return lower

    def _cheapest_in(self, tier: str, counter: _Counter, reserve: int) -> tuple[str, int]:
        """The tier's cheapest model whose window fits, else its cheapest (with its count)."""
        priced = sorted(((self._price(m), m) for m in self.tiers[tier]),
                        key=lambda pm: _cost(pm[0], counter(pm[1]), reserve))
        for price, model in priced:
            tokens = counter(model)
            if _fits(price, tokens, reserve):
                return model, tokens
        model = priced[0][1]
        return model, counter(model)

    def _fit(self, tier: str, counter: _Counter, reserve: int,
             reasons: list[str]) -> tuple[str, int]:
        model, tokens = self._cheapest_in(tier, counter, reserve)
        price = self._price(model)
        if _fits(price, tokens, reserve):
            return model, tokens
        fitting = [(m, counter(m)) for m in self.models
                   if _fits(self._price(m), counter(m), reserve)]
        if not fitting:
            largest = max(_window(self._price(m)) for m in self.models)
            raise ContextWindowExceeded(
                f"prompt of {tokens} tokens + {reserve} reserved output tokens fits no routed "
                f"model (largest window {largest} tokens among {', '.join(self.models)})",
                tokens=tokens + reserve, limit=largest)
        best, best_tokens = min(fitting, key=lambda mt: _cost(self._price(mt[0]), mt[1], reserve))
        reasons.append(f"context fit: {tokens} + {reserve} tokens exceed {model}'s window of "
                       f"{_window(price)} -> {best} (window {_window(self._price(best))})")
        return best, best_tokens

    def _check_fits(self, model: str, tokens: int, reserve: int) -> None:
        price = self._price(model)
        if not _fits(price, tokens, reserve):
            raise ContextWindowExceeded(
                f"prompt of {tokens} tokens + {reserve} reserved output tokens exceeds the "
                f"required model {model}'s window of {_window(price)} tokens",
                tokens=tokens + reserve, limit=_window(price))

    def _price(self, model: str) -> ModelPrice:
        return self.catalog.get(model)


# ---------------------------------------------------------------------------- helpers

class _Counter:
    """Counts the prompt once per model (tokenizers differ between model families)."""

    def __init__(self, catalog: PriceCatalog, prompt: str | None,
                 messages: Sequence[Mapping[str, Any]] | None,
                 tools: Sequence[Mapping[str, Any]] | None) -> None:
        self.catalog, self.prompt, self.messages, self.tools = catalog, prompt, messages, tools
        self._counts: dict[str, int] = {}

    def __call__(self, model: str) -> int:
        count = self._counts.get(model)
        if count is None:
            if self.messages is not None:
                count = count_message_tokens(self.messages, model, tools=self.tools,
                                             catalog=self.catalog)
            else:
                count = count_tokens(self.prompt or "", model, catalog=self.catalog)
            self._counts[model] = count
        return count


def _messages_text(messages: Iterable[Mapping[str, Any]]) -> str:
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content blocks: keep the text ones
            parts.extend(str(block.get("text", "")) for block in content
                         if isinstance(block, Mapping))
    return "\n".join(parts)


def _window(price: ModelPrice) -> int:
    return price.context_window or price.max_input_tokens


def _fits(price: ModelPrice, tokens: int, reserve: int) -> bool:
    window = _window(price)
    if window <= 0:  # catalog does not say: assume it fits
        return True
    if price.max_input_tokens and tokens > price.max_input_tokens:
        return False
    return tokens + reserve <= window


def _cost(price: ModelPrice, tokens: int, reserve: int) -> int:
    return price.cost_picos(tokens, reserve)


def _level_tier(level: str, tier: str) -> str:
    return f"tier {tier}" if level == tier else f"{level} level, tier {tier}"


def _describe(signals: Mapping[str, Any]) -> str:
    parts = [f"{signals.get('tokens', 0)} tokens"]
    if signals.get("code"):
        parts.append("code")
    cues = signals.get("reasoning_cues") or ()
    if cues:
        parts.append("cues " + "/".join(cues[:4]))
    if signals.get("constraints"):
        parts.append(f"{signals['constraints']} constraints")
    return ", ".join(parts)
