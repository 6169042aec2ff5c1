"""Ready-made budgets from the Token Budget seed.

- :func:`token_ladder_budgets`: the seed's graded ladders, per run (10k / 50k / 100k
  tokens), per day (50k / 200k / 500k) and per month (1.5M / 6M / 15M): below the first
  number is normal, then moderate (warn), high (alert, flag for review), and past the last
  critical (stop until approved).
- :func:`model_token_budgets`: the seed's per-model run / day / month token budgets for
  the Groq and OpenAI models, each model counted on its own.

Both return plain :class:`Budget` lists; pass them to ``engine.add_budget`` or name them in
a budget file (``presets = ["token-ladders"]``).
"""

from __future__ import annotations

from collections.abc import Callable

from budgetkit.errors import ConfigurationError

from ._budget import Budget, BudgetLevels, Period

__all__ = ["token_ladder_budgets", "model_token_budgets", "seed_budgets", "preset", "PRESETS"]

# (period, moderate from, high from, critical from) in tokens, as the seed writes them.
TOKEN_LADDERS: tuple[tuple[Period, int, int, int], ...] = (
    ("run", 10_000, 50_000, 100_000),
    ("day", 50_000, 200_000, 500_000),
    ("month", 1_500_000, 6_000_000, 15_000_000),
)

# model (or "*" for the provider's other models) -> (per run, per day, per month) tokens.
MODEL_TOKEN_BUDGETS: dict[str, dict[str, tuple[int, int, int]]] = {
    "groq": {
        "llama-3.3-70b-versatile": (50_000, 200_000, 6_000_000),
        "llama-3.1-8b-instant": (20_000, 100_000, 3_000_000),
        "*": (30_000, 150_000, 4_500_000),
    },
    "openai": {
        "gpt-4o-mini": (30_000, 150_000, 4_500_000),
        "gpt-4o": (20_000, 100_000, 3_000_000),
        "gpt-3.5-turbo": (40_000, 200_000, 6_000_000),
    },
}


def token_ladder_budgets(*, timezone: str = "UTC", require_approval: bool = True,
                         prefix: str = "tokens") -> list[Budget]:
    """The seed's per-run, daily and monthly token ladders as three global budgets."""
    return [
        Budget(name=f"{prefix}-per-{period}" if period == "run" else f"{prefix}-{period}ly"
               if period == "month" else f"{prefix}-daily",
               limit=critical, unit="tokens", period=period,
               timezone=timezone, require_approval=require_approval,
               levels=BudgetLevels(moderate=moderate, high=high, critical=critical,
                                   absolute=True),
               description=f"Token Budget seed: {period} ladder {moderate:,} / {high:,} / "
                           f"{critical:,} tokens")
        for period, moderate, high, critical in TOKEN_LADDERS
    ]


def model_token_budgets(*, timezone: str = "UTC", require_approval: bool = True
                        ) -> list[Budget]:
    """The seed's per-model budgets: run, day and month token limits per model.

    "Other Groq models" holds for each Groq model not named, separately.
    """
    budgets: list[Budget] = []
    for provider, models in MODEL_TOKEN_BUDGETS.items():
        named = tuple(model for model in models if model != "*")
        for model, limits in models.items():
            periods: tuple[Period, ...] = ("run", "day", "month")
            for period, limit in zip(periods, limits):
                label = model if model != "*" else f"{provider}-other"
                budgets.append(Budget(
                    name=f"model-{label}-{period}", limit=limit, unit="tokens",
                    period=period,
                    scope="model", match=None if model == "*" else model,
                    provider=provider if model == "*" else None,
                    exclude=named if model == "*" else (), timezone=timezone,
                    require_approval=require_approval,
                    description=f"Token Budget seed: {label} per {period}"))
    return budgets


def seed_budgets(*, timezone: str = "UTC") -> list[Budget]:
    """Both presets together."""
    return [*token_ladder_budgets(timezone=timezone), *model_token_budgets(timezone=timezone)]


PRESETS: dict[str, Callable[[], list[Budget]]] = {
    "token-ladders": token_ladder_budgets,
    "model-token-budgets": model_token_budgets,
    "seed": seed_budgets,
}


def preset(name: str) -> list[Budget]:
    """The budgets of a preset by name (used by budget files)."""
    factory = PRESETS.get(name)
    if factory is None:
        raise ConfigurationError(f"unknown budget preset {name!r}; known: {', '.join(PRESETS)}")
    return factory()
