"""Where the router's learning meets the store: fitted scorers and cascade verdicts.

* A fitted scorer is saved as a :class:`RouterScorerRow` (append-only; the newest row of a
  name wins), so every process of an app routes with the same weights.
* A cascade verdict (was the cheapest model's answer acceptable?) rides in the usage row of
  that attempt, under ``metadata["route_verdict"]``: it is written by the ledger's batch
  writer with the row, off the hot path, and purged with it. It holds the prompt's hashed
  features (:class:`PromptFeatures`), not its text, unless the cascade was told
  ``verdict_prompts=True``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from budgetkit.errors import ConfigurationError

from ._features import PromptFeatures
from ._scorer import Scorer

# SQLAlchemy, SQLModel and the tables are imported inside the functions that use the store:
# importing budgetkit.routing (a Router without an engine) stays free of the database stack.

__all__ = ["VERDICT_KEY", "verdict_metadata", "save_scorer", "load_scorer", "load_verdicts"]

VERDICT_KEY = "route_verdict"


def verdict_metadata(features: PromptFeatures, cheap_failed: bool,
                     prompt: str | None = None) -> dict[str, Any]:
    """The ``metadata`` entry a cascade adds to its first attempt's usage row."""
    verdict: dict[str, Any] = {"cheap_failed": bool(cheap_failed),
                               "features": features.to_dict()}
    if prompt is not None:
        verdict["prompt"] = prompt
    return {VERDICT_KEY: verdict}


def _store(engine: Any) -> Any:
    store = getattr(engine, "store", None)
    if store is None or not hasattr(store, "engine"):
        raise ConfigurationError(f"expected a budgetkit Engine with a store, got {engine!r}")
    store.ensure_tables()
    return store


def save_scorer(engine: Any, name: str, scorer: Scorer) -> None:
    from sqlmodel import Session

    from ._tables import RouterScorerRow

    store = _store(engine)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    with Session(store.engine) as session:
        session.add(RouterScorerRow(name=name, created_at=now, n_outcomes=scorer.n_outcomes,
                                    scorer=scorer.to_json()))
        session.commit()


def load_scorer(engine: Any, name: str) -> Scorer | None:
    """The newest scorer saved under ``name``, or None."""
    from sqlalchemy import select

    from ._tables import RouterScorerRow

    store = _store(engine)
    query = (select(RouterScorerRow.scorer).where(RouterScorerRow.name == name)  # type: ignore[call-overload]
             .order_by(RouterScorerRow.id.desc()).limit(1))  # type: ignore[union-attr]
    with store.engine.connect() as connection:
        text = connection.execute(query).scalar()
    return None if text is None else Scorer.from_json(text)


def load_verdicts(engine: Any, *, since: dt.datetime | None = None
                  ) -> tuple[list[PromptFeatures], list[bool]]:
    """Every cascade verdict in the ledger (oldest first), as features and labels."""
    from sqlalchemy import select

    from budgetkit.ledger import UsageRow

    if since is not None and not isinstance(since, dt.datetime):
        raise ConfigurationError(f"since must be a datetime, got {since!r}")
    flush = getattr(engine, "flush", None)
    if flush is not None:
        flush(return_leases=False)  # rows still queued in the writer count too
    store = _store(engine)
    query = select(UsageRow.metadata_).where(UsageRow.attempt == 1)  # type: ignore[call-overload]
    if since is not None:
        if since.tzinfo is not None:
            since = since.astimezone(dt.timezone.utc).replace(tzinfo=None)
        query = query.where(UsageRow.created_at >= since)
    query = query.order_by(UsageRow.created_at, UsageRow.id)
    features: list[PromptFeatures] = []
    labels: list[bool] = []
    with store.engine.connect() as connection:
        for (metadata,) in connection.execute(query):
            verdict = metadata.get(VERDICT_KEY) if isinstance(metadata, Mapping) else None
            if not isinstance(verdict, Mapping):
                continue
            features.append(PromptFeatures.from_dict(verdict["features"]))
            labels.append(bool(verdict["cheap_failed"]))
    return features, labels
