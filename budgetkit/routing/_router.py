"""Pick a model per request from tiers the user names, and say why.

A :class:`Router` holds tiers ordered from cheapest to strongest, e.g.
``{"low": "gpt-4o-mini", "medium": "gpt-4.1-mini", "high": "gpt-4o"}``; each tier holds one
or more catalog model names. :meth:`Router.route` decides in this order:

1. an explicit model the caller requires (it must still fit its window);
2. the task type, using the Cost Optimization Reference's lists (``TASK_LEVELS``);
3. otherwise the learned scorer's estimate that the cheapest tier's answer will not be
   acceptable (``RouteDecision.score``, 0..1; see :class:`~budgetkit.routing.Scorer`): at or
   above the high threshold the strongest tier, at or above the medium one the middle tier;

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
optional budget-headroom lookup and, with an ``engine``, loading the latest fitted scorer.

Learning (:meth:`Router.fit`, :meth:`Router.fit_from_ledger`) lives in ``_learning.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from budgetkit.errors import ConfigurationError, ContextWindowExceeded
from budgetkit.pricing import ModelPrice, PriceCatalog, default_catalog

from ._prompt import _Counter, _describe, _messages_text, complexity_score
from ._scorer import Scorer, default_scorer
from ._share import ShareTracker

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

#: With three tiers and no thresholds given, the share of prompts (after the high ones) that
#: go to the middle tier.
DEFAULT_MEDIUM_SHARE = 0.25


@dataclass(frozen=True)
class RouteDecision:
    """The model a request should use, the tier it came from, and why."""

    model: str
    tier: str | None
    reasons: tuple[str, ...]
    #: The scorer's estimate that the cheapest tier's answer is not acceptable (0..1);
    #: ``None`` when a required model or the task type decided.
    score: float | None = None
    input_tokens: int | None = None
    signals: Mapping[str, Any] = field(default_factory=dict)

    @property
    def complexity(self) -> float | None:
        """Former name of :attr:`score` (it was a hand-weighted heuristic until 0.x)."""
        return self.score

    @property
    def reason(self) -> str:
        """The reasons as one line, the form ``Engine.admit(route_reason=...)`` stores."""
        return "; ".join(self.reasons)


# ----------------------------------------------------------------------------- router

class Router:
    """Choose a model per request from named tiers, cheapest tier first.

    ``tiers`` maps a tier name to one model name or a list of them, in order from the
    cheapest tier to the strongest (dict order). Within a tier the cheapest model whose
    window fits is used. Every model must be in the catalog (``engine.catalog``, else
    ``catalog``, else the bundled one).

    ``levels`` maps the task levels "low" / "medium" / "high" to tier names when the tiers
    are named otherwise (default: same name if present, else the first, middle-rounded-down
    and last tier).

    Without a task type the prompt is scored by ``scorer`` (default: the shipped
    :func:`~budgetkit.routing.default_scorer`; with an ``engine``, the latest scorer fitted
    under ``scorer_name`` and saved in its store). The score estimates P(the cheapest tier's
    answer is not acceptable); it goes to the "high" level at or above the high threshold and
    to "medium" at or above the medium one. Thresholds, first given wins:
    ``thresholds=(medium, high)`` (``complexity_thresholds`` is its former name);
    ``strong_share`` (about that share of *your* prompts go high, the next ``medium_share``
    medium); else the default: a prompt goes high when it looks harder than *your* average
    prompt (its score is above the mean score of the recent prompts; with three tiers the
    next ``medium_share``, 25 %, go medium). Shares and the default follow the scores of the
    last ``share_window`` prompts this router scored, once it has scored ``share_warmup`` of
    them (see :mod:`._share`); before that, and always with ``share_window=0``, the scorer's
    training prompts set them: for the default, :attr:`Scorer.threshold` (for the shipped
    scorer 0.348, the cheap model's average failure rate on its training data).
    :meth:`calibrate` fixes them from a sample of your prompts.

    ``budget_threshold`` is the remaining budget fraction below which the router goes one
    tier down; the fraction comes from ``headroom(model=, user_id=, project=, tags=,
    operation_type=)`` or, when not given, ``engine.budget_headroom`` if the engine has it.
    ``fastest_tier`` is used for ``low_latency`` requests (default: the first tier).
    ``default_max_output_tokens`` is the output reserved for the context-fit check when a
    request does not say.
    """

    def __init__(self, tiers: Mapping[str, str | Sequence[str]], *, engine: Any = None,
                 catalog: PriceCatalog | None = None,
                 levels: Mapping[str, str] | None = None,
                 task_levels: Mapping[str, str] = TASK_LEVELS,
                 scorer: Scorer | None = None,
                 thresholds: tuple[float, float] | None = None,
                 strong_share: float | None = None,
                 medium_share: float = DEFAULT_MEDIUM_SHARE,
                 share_window: int = 1000,
                 share_warmup: int = 100,
                 scorer_name: str = "default",
                 complexity_thresholds: tuple[float, float] | None = None,
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
        if scorer is not None and not isinstance(scorer, Scorer):
            raise ConfigurationError(f"scorer must be a budgetkit Scorer, got {scorer!r}")
        if not isinstance(scorer_name, str) or not scorer_name:
            raise ConfigurationError(f"scorer_name must be a non-empty str, got {scorer_name!r}")
        self.scorer_name = scorer_name
        #: What :meth:`fit` starts from every time (so refits never count outcomes twice).
        self.base_scorer: Scorer = scorer if scorer is not None else default_scorer()
        self.scorer: Scorer = self.base_scorer
        if thresholds is not None and complexity_thresholds is not None:
            raise ConfigurationError("give thresholds or complexity_thresholds, not both")
        self._rule: tuple[str, Any] = ("default", None)
        if thresholds is not None or complexity_thresholds is not None:
            name = "thresholds" if thresholds is not None else "complexity_thresholds"
            given = thresholds if thresholds is not None else complexity_thresholds
            assert given is not None
            low, high = given
            if not 0.0 <= low <= high <= 1.0:
                raise ConfigurationError(
                    f"{name} must satisfy 0 <= medium <= high <= 1, got {given}")
            self._rule = ("explicit", (float(low), float(high)))
        elif strong_share is not None:
            if not (0.0 <= strong_share <= 1.0 and 0.0 <= medium_share <= 1.0):
                raise ConfigurationError(
                    f"strong_share and medium_share must be within 0..1, got {strong_share} "
                    f"and {medium_share}")
            self._rule = ("share", (float(strong_share), float(medium_share)))
        self._medium_share = medium_share
        #: The recent scores the thresholds follow (None: thresholds are fixed, as with
        #: explicit ``thresholds``, after :meth:`calibrate`, or with ``share_window=0``).
        self.share_tracker = ShareTracker.for_router(
            strong_share, medium_share, window=share_window, warmup=share_warmup,
            fixed=self._rule[0] == "explicit")
        if engine is not None and scorer is None:
            from ._learning import load_scorer  # store I/O stays in one module

            fitted = load_scorer(engine, scorer_name)
            if fitted is not None:
                self.scorer = fitted
        self._fixed_thresholds = self._resolve_thresholds()
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

    @property
    def thresholds(self) -> tuple[float, float]:
        """``(medium, high)``: the scores at or above which a prompt goes to the medium and
        the high level now (unless fixed, they follow the recent prompts: see
        :attr:`share_tracker`)."""
        if self.share_tracker is None:
            return self._fixed_thresholds
        return self.share_tracker.thresholds(self._fixed_thresholds)

    @property
    def complexity_thresholds(self) -> tuple[float, float]:
        """Former name of :attr:`thresholds`."""
        return self.thresholds

    def _resolve_thresholds(self) -> tuple[float, float]:
        kind, value = self._rule
        if kind == "explicit":
            return value  # type: ignore[no-any-return]
        if kind == "share":
            high_share, medium_share = value
        else:
            high_share, medium_share = self.scorer._default_share(), self._medium_share
        high = (self.scorer.threshold if kind == "default"
                else self.scorer.threshold_for_share(high_share))
        medium = self.scorer.threshold_for_share(min(1.0, high_share + medium_share))
        return (min(medium, high), high)

    def use_scorer(self, scorer: Scorer) -> None:
        """Route with ``scorer`` from now on (thresholds given as shares follow it)."""
        if not isinstance(scorer, Scorer):
            raise ConfigurationError(f"scorer must be a budgetkit Scorer, got {scorer!r}")
        self.scorer = scorer
        self._fixed_thresholds = self._resolve_thresholds()
        if self.share_tracker is not None:
            self.share_tracker.reset()

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
        """Set the thresholds from a sample of your own prompts (no labels needed).

        Afterwards about ``high_share`` of prompts like these score "high" and the next
        ``medium_share`` "medium". Returns the new ``thresholds``. Ties in the scores can
        move slightly more prompts up than asked.
        """
        if not (0.0 <= high_share <= 1.0 and 0.0 <= medium_share <= 1.0
                and high_share + medium_share <= 1.0):
            raise ConfigurationError(
                f"high_share and medium_share must be within 0..1 and sum to <= 1, got "
                f"{high_share} and {medium_share}")
        scores = sorted(self.scorer.score(text) for text in prompts)
        if not scores:
            raise ConfigurationError("calibrate needs at least one prompt")

        def quantile_above(share: float) -> float:
            if share <= 0.0:
                return min(1.0, scores[-1] + 1e-9)
            return scores[min(len(scores) - 1, max(0, int((1.0 - share) * len(scores))))]

        high = quantile_above(high_share)
        medium = min(high, quantile_above(high_share + medium_share))
        self._rule = ("explicit", (min(medium, 1.0), min(high, 1.0)))
        self.share_tracker = None  # explicit thresholds from now on
        self._fixed_thresholds = self._resolve_thresholds()
        return self._fixed_thresholds

    # -- learning (see _learning.py) ----------------------------------------------------
    def fit(self, prompts: Sequence[str], cheap_failed: Sequence[bool], *,
            save: bool = True) -> Scorer:
        """Adapt the scorer to your outcomes and route with it from now on.

        ``cheap_failed[i]`` says whether the cheapest tier's answer to ``prompts[i]`` was not
        acceptable. The fit starts from :attr:`base_scorer` (the shipped one by default)
        each time, so pass all the outcomes you have. With an engine (and ``save``) the
        fitted scorer is stored, and every router built on that ledger with the same
        ``scorer_name`` loads it.
        """
        from ._learning import save_scorer

        fitted = self.base_scorer.fit(prompts, cheap_failed)
        if save and self.engine is not None:
            save_scorer(self.engine, self.scorer_name, fitted)
        self.use_scorer(fitted)
        return fitted

    def fit_from_ledger(self, engine: Any = None, *, since: Any = None,
                        save: bool = True) -> Scorer:
        """Fit on the cascade verdicts recorded in ``engine``'s ledger (default: this
        router's engine) since ``since`` (a datetime; default: all). Verdicts hold hashed
        features, so no prompt text is needed. Raises ConfigurationError when there is none.
        """
        from ._learning import load_verdicts, save_scorer

        engine = engine if engine is not None else self.engine
        if engine is None:
            raise ConfigurationError("fit_from_ledger needs an engine (argument or the router's)")
        features, labels = load_verdicts(engine, since=since)
        if not features:
            raise ConfigurationError(
                f"no cascade verdicts in the ledger{'' if since is None else f' since {since}'}"
                f"; run a Cascade with an engine first")
        fitted = self.base_scorer.fit_features(features, labels)
        if save:
            save_scorer(engine, self.scorer_name, fitted)
        self.use_scorer(fitted)
        return fitted

    def reload_scorer(self) -> bool:
        """Load the latest scorer saved under :attr:`scorer_name` (another process may have
        fitted one). Returns whether one was found."""
        from ._learning import load_scorer

        if self.engine is None:
            raise ConfigurationError("reload_scorer needs a router with an engine")
        fitted = load_scorer(self.engine, self.scorer_name)
        if fitted is not None:
            self.use_scorer(fitted)
        return fitted is not None

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
            _, signals = complexity_score(text, tokens=counter(self.tiers[self.order[0]][0]))
            score = self.scorer.score(text)
            if self.share_tracker is not None:
                self.share_tracker.observe(score)
            medium, high = self.thresholds
            level = "high" if score >= high else "medium" if score >= medium else "low"
            tier = self.levels[level]
            prefix = f"task type {task_type} not in the table; " if task_type else ""
            source = "" if self.share_tracker is None else f"{self.share_tracker.source()}; "
            reasons.append(f"{prefix}score {score:.3f} = P(cheap answer fails), thresholds "
                           f"{medium:.3f}/{high:.3f} ({source}{_describe(signals)}) -> "
                           f"{_level_tier(level, tier)}")

        tier = self._apply_budget_pressure(tier, reasons, user_id=user_id, project=project,
                                           tags=tuple(tags), operation_type=operation_type,
                                           counter=counter, reserve=reserve)
        if low_latency and tier != self.fastest_tier:
            tier = self.fastest_tier
            reasons.append(f"low latency -> fastest tier {tier}")

        model, tokens = self._fit(tier, counter, reserve, reasons)
        return RouteDecision(model, self.tier_of(model), tuple(reasons), score=score,
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
