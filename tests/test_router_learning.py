"""Learning to route from outcomes, end to end on a real SQLite ledger with fake models:
cascade verdicts in the ledger -> fit_from_ledger -> a stored scorer -> different routes,
in this router and in a new one opened on the same ledger."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from budgetkit import Cascade, ConfigurationError, Engine, Router
from budgetkit.routing import Completion, MinLength, default_scorer
from budgetkit.routing._tables import RouterScorerRow

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"
TIERS = {"cheap": CHEAP, "strong": STRONG}


def maths(i: int) -> str:
    return f"Compute the definite integral of x^{i % 7 + 2} from 0 to {i + 1}, exactly."


def cafe(i: int) -> str:
    return f"Suggest a friendly name for a cafe on street number {i + 1}, please."


def fake_models(model: str, prompt: str) -> Completion:
    """The cheap model gives up on integrals; the strong one answers everything."""
    if model == CHEAP and "integral" in prompt:
        return Completion("?", input_tokens=20, output_tokens=1)
    return Completion(f"A fine answer from {model} to: {prompt}", input_tokens=20,
                      output_tokens=12)


def run_traffic(engine: Engine, n: int = 30, **cascade_kwargs: object) -> Cascade:
    cascade = Cascade([CHEAP, STRONG], [MinLength(5)], engine=engine, **cascade_kwargs)
    for i in range(n):
        for prompt in (maths(i), cafe(i)):
            cascade.run(lambda model, p=prompt: fake_models(model, p), prompt=prompt)
    return cascade


@pytest.fixture
def engine(tmp_path):
    with Engine(db=str(tmp_path / "ledger.db")) as eng:
        yield eng


def test_ledger_verdicts_teach_the_router_and_every_router_on_the_ledger_follows(
        engine: Engine, tmp_path) -> None:
    run_traffic(engine)
    probe_maths, probe_cafe = maths(100), cafe(100)
    router = Router(TIERS, engine=engine)
    # same length, so the shipped scorer cannot tell them apart
    assert router.route(probe_maths).model == router.route(probe_cafe).model

    fitted = router.fit_from_ledger()
    assert fitted.n_outcomes == 60
    assert router.route(probe_maths).model == STRONG
    assert router.route(probe_cafe).model == CHEAP
    decision = router.route(probe_maths)
    assert decision.score is not None and decision.score > router.thresholds[1]

    # another process: a new router on the same ledger file routes the same way
    engine.flush()
    with Engine(db=str(tmp_path / "ledger.db")) as other_process:
        again = Router(TIERS, engine=other_process)
        assert again.scorer.n_outcomes == 60
        assert again.route(probe_maths).model == STRONG
        assert again.route(probe_cafe).model == CHEAP
        # an explicit scorer is the user's choice: it is not replaced by the stored one
        assert Router(TIERS, engine=other_process,
                      scorer=default_scorer()).scorer is default_scorer()


def test_verdicts_hold_features_not_text_unless_asked(engine: Engine) -> None:
    run_traffic(engine, n=2)
    rows = [r for r in engine.usage() if r.attempt == 1]
    assert len(rows) == 4
    verdicts = [r.metadata_["route_verdict"] for r in rows]
    assert sorted(v["cheap_failed"] for v in verdicts) == [False, False, True, True]
    assert all(set(v) == {"cheap_failed", "features"} for v in verdicts)
    stored = json.dumps([r.metadata_ for r in rows])
    assert "integral" not in stored and "cafe" not in stored

    run_traffic(engine, n=1, verdict_prompts=True)
    with_text = [r.metadata_["route_verdict"] for r in engine.usage() if r.attempt == 1][-2:]
    assert {v["prompt"] for v in with_text} == {maths(0), cafe(0)}


def test_the_cascade_reason_lands_in_route_reason(engine: Engine) -> None:
    run_traffic(engine, n=1)
    rows = sorted((r for r in engine.usage() if "integral" not in str(r.metadata_)),
                  key=lambda r: (r.request_id, r.attempt))
    escalated = [r for r in rows if r.attempt == 2]
    assert len(escalated) == 1
    assert escalated[0].route_reason == ("cascade attempt 2/2: gpt-4o-mini answer failed: "
                                         "too short (1 < 5 chars)")
    assert "route_reason" not in escalated[0].metadata_
    first = [r for r in rows if r.attempt == 1]
    assert all(r.route_reason == "cascade attempt 1/2: cheapest first" for r in first)


def test_no_verdicts_without_a_prompt_or_when_turned_off(engine: Engine) -> None:
    cascade = Cascade([CHEAP, STRONG], [MinLength(5)], engine=engine)
    cascade.run(lambda model: fake_models(model, "x"), input_tokens=5)
    Cascade([CHEAP, STRONG], [MinLength(5)], engine=engine, record_verdicts=False).run(
        lambda model: fake_models(model, "x"), prompt="x")
    assert all("route_verdict" not in r.metadata_ for r in engine.usage())
    with pytest.raises(ConfigurationError, match="no cascade verdicts"):
        Router(TIERS, engine=engine).fit_from_ledger()


def test_fit_from_ledger_since_keeps_only_newer_verdicts(engine: Engine) -> None:
    run_traffic(engine, n=3)
    router = Router(TIERS, engine=engine)
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    with pytest.raises(ConfigurationError, match="since"):
        router.fit_from_ledger(since=future)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    assert router.fit_from_ledger(since=past).n_outcomes == 6
    with pytest.raises(ConfigurationError, match="datetime"):
        router.fit_from_ledger(since="yesterday")


def test_fit_from_texts_is_saved_and_reloaded(engine: Engine) -> None:
    router = Router(TIERS, engine=engine)
    prompts = [maths(i) for i in range(20)] + [cafe(i) for i in range(20)]
    router.fit(prompts, [True] * 20 + [False] * 20)
    other = Router(TIERS, engine=engine)
    assert other.route(maths(50)).model == STRONG and other.route(cafe(50)).model == CHEAP
    # a refit starts from the base scorer again: outcomes are never counted twice
    router.fit(prompts, [True] * 20 + [False] * 20)
    assert router.scorer.n_outcomes == 40
    assert other.reload_scorer() and other.scorer.n_outcomes == 40
    from sqlmodel import Session, select
    with Session(engine.store.engine) as session:
        assert len(session.exec(select(RouterScorerRow)).all()) == 2


def test_learning_needs_an_engine_and_a_scorer_is_a_scorer() -> None:
    router = Router(TIERS)
    with pytest.raises(ConfigurationError, match="needs an engine"):
        router.fit_from_ledger()
    with pytest.raises(ConfigurationError, match="needs a router with an engine"):
        router.reload_scorer()
    with pytest.raises(ConfigurationError, match="Scorer"):
        Router(TIERS, scorer="length")  # type: ignore[arg-type]
    fitted = router.fit([maths(1), cafe(1)], [True, False])  # no engine: kept in memory
    assert router.scorer is fitted


def test_strong_share_and_thresholds(engine: Engine) -> None:
    prompts = [("word " * n).strip() for n in range(1, 101)]
    calibrated = Router(TIERS)
    calibrated.calibrate(prompts, high_share=0.3)
    assert sum(calibrated.route(p).model == STRONG for p in prompts) == 30
    shared = Router(TIERS, strong_share=0.3)
    assert shared.thresholds[1] == pytest.approx(default_scorer().threshold_for_share(0.3))
    assert Router(TIERS, thresholds=(0.0, 0.0)).route("hi").model == STRONG
    assert Router(TIERS, thresholds=(1.0, 1.0)).route("word " * 500).model == CHEAP
    with pytest.raises(ConfigurationError, match="not both"):
        Router(TIERS, thresholds=(0.1, 0.2), complexity_thresholds=(0.1, 0.2))
    with pytest.raises(ConfigurationError, match="strong_share"):
        Router(TIERS, strong_share=1.2)
