"""Router: decision order, explainable reasons, budget pressure, latency, context fit."""

from __future__ import annotations

import pytest

from budgetkit import (ConfigurationError, ContextWindowExceeded, Engine, PriceCatalog,
                       Router, UnknownModelError)
from budgetkit.routing._router import complexity_score

TIERS = {"low": "gpt-4o-mini", "medium": "gpt-4.1-mini", "high": "gpt-4o"}


@pytest.fixture
def router() -> Router:
    return Router(TIERS)


def test_simple_prompt_goes_to_the_cheapest_tier(router: Router) -> None:
    decision = router.route("What is the capital of France?")
    assert decision.model == "gpt-4o-mini"
    assert decision.tier == "low"
    assert "P(cheap answer fails)" in decision.reason and "tier low" in decision.reason
    assert decision.score is not None and decision.score < router.thresholds[0]
    assert decision.input_tokens == 7


def test_hard_prompt_with_code_cues_and_constraints_goes_high(router: Router) -> None:
    prompt = ("Explain step by step why this function is slow, compare the trade-offs of two "
              "fixes and prove the complexity. You must keep the API; at most 20 lines.\n"
              "```python\ndef f(xs):\n    return [x for x in xs if xs.count(x) > 1]\n```")
    decision = router.route(prompt)
    assert decision.model == "gpt-4o"
    assert decision.score is not None and decision.score >= router.thresholds[1]
    assert decision.signals["code"] is True
    assert "step by step" in decision.signals["reasoning_cues"]


def test_complexity_score_grows_with_each_signal() -> None:
    base, _ = complexity_score("Tell me a joke", tokens=4)
    cued, _ = complexity_score("Explain why and compare the options", tokens=7)
    coded, signals = complexity_score("```\nint main() {\n return 0;\n}\n```", tokens=12)
    longer, _ = complexity_score("Tell me a joke", tokens=1_500)
    assert base < cued and base < coded and base < longer
    assert signals["code"] is True
    constrained, signals = complexity_score(
        "- must be short\n- never use jargon\n- at most 3 items")
    assert signals["constraints"] >= 3 and constrained > base


@pytest.mark.parametrize("task_type, model", [
    ("complex_reasoning", "gpt-4o"), ("code_review", "gpt-4o"),
    ("architecture_design", "gpt-4o"), ("multi_step_analysis", "gpt-4o"),
    ("code_generation", "gpt-4.1-mini"), ("summarization", "gpt-4.1-mini"),
    ("translation", "gpt-4.1-mini"), ("analysis", "gpt-4.1-mini"),
])
def test_task_type_table_from_the_seed(router: Router, task_type: str, model: str) -> None:
    decision = router.route("hi", task_type=task_type)
    assert decision.model == model
    assert decision.reasons[0].startswith(f"task type {task_type}")
    assert decision.score is None


def test_unknown_task_type_falls_back_to_complexity(router: Router) -> None:
    decision = router.route("hi", task_type="chit_chat")
    assert decision.model == "gpt-4o-mini"
    assert "not in the table" in decision.reason


def test_required_model_wins_over_everything(router: Router) -> None:
    decision = router.route("hi", required_model="gpt-4o", task_type="translation",
                            low_latency=True)
    assert decision.model == "gpt-4o" and decision.reasons == ("required model gpt-4o",)
    with pytest.raises(UnknownModelError):
        router.route("hi", required_model="no-such-model")


def test_budget_pressure_moves_one_tier_down() -> None:
    seen = {}

    def headroom(**scope):
        seen.update(scope)
        return 0.1

    router = Router(TIERS, headroom=headroom, budget_threshold=0.2)
    decision = router.route("hi", task_type="code_review", user_id="u1", project="p",
                            tags=("a",))
    assert decision.model == "gpt-4.1-mini"
    assert "budget headroom 10% < 20%" in decision.reason
    assert seen == {"model": "gpt-4o", "user_id": "u1", "project": "p", "tags": ("a",),
                    "operation_type": None}


def test_budget_with_room_or_no_budget_changes_nothing() -> None:
    for value in (0.5, None):
        router = Router(TIERS, headroom=lambda value=value, **_: value)
        decision = router.route("hi", task_type="code_review")
        assert decision.model == "gpt-4o" and "budget" not in decision.reason


def test_budget_pressure_on_cheapest_tier_stays_and_says_so() -> None:
    router = Router(TIERS, headroom=lambda **_: 0.0)
    decision = router.route("hi")
    assert decision.model == "gpt-4o-mini"
    assert "already on the cheapest tier" in decision.reason


def test_engine_budget_headroom_is_used_when_the_engine_has_it(tmp_path) -> None:
    class EngineWithBudgets(Engine):
        def budget_headroom(self, **scope):
            return 0.05

    with EngineWithBudgets(db=str(tmp_path / "u.db")) as engine:
        decision = Router(TIERS, engine=engine).route("hi", task_type="code_review")
    assert decision.model == "gpt-4.1-mini"


def test_low_latency_picks_the_fastest_tier() -> None:
    router = Router(TIERS, fastest_tier="medium")
    decision = router.route("hi", task_type="code_review", low_latency=True)
    assert decision.model == "gpt-4.1-mini"
    assert "low latency -> fastest tier medium" in decision.reason


def test_context_fit_moves_to_the_cheapest_model_whose_window_fits() -> None:
    router = Router({"low": "gpt-3.5-turbo", "mid": "gpt-4o-mini", "high": "gpt-4.1"},
                    complexity_thresholds=(0.9, 0.95))  # length alone stays "low"
    prompt = "hello " * 20_000  # 20k tokens: over gpt-3.5-turbo's 16k window
    decision = router.route(prompt, max_output_tokens=100)
    assert decision.model == "gpt-4o-mini"
    assert "context fit" in decision.reason and "16385" in decision.reason


def test_reserved_output_counts_towards_the_window() -> None:
    router = Router({"low": "gpt-3.5-turbo", "high": "gpt-4o"}, complexity_thresholds=(0.9, 0.95))
    prompt = "hello " * 15_000
    assert router.route(prompt, max_output_tokens=100).model == "gpt-3.5-turbo"
    assert router.route(prompt, max_output_tokens=4_000).model == "gpt-4o"


def test_no_window_fits_raises_a_typed_error() -> None:
    router = Router({"low": "gpt-3.5-turbo", "high": "gpt-4"})
    with pytest.raises(ContextWindowExceeded) as info:
        router.route("hello " * 20_000, max_output_tokens=10)
    assert info.value.limit == 16385 and info.value.tokens > 20_000
    with pytest.raises(ContextWindowExceeded):
        router.route("hello " * 9_000, required_model="gpt-4")


def test_tier_with_several_models_uses_its_cheapest_that_fits() -> None:
    router = Router({"low": ["gpt-4o-mini", "gpt-4.1-nano"], "high": "gpt-4o"})
    assert router.route("hi").model == "gpt-4.1-nano"
    assert router.models == ["gpt-4o-mini", "gpt-4.1-nano", "gpt-4o"]


def test_messages_are_counted_with_chat_overhead(router: Router) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?"}]
    decision = router.route(messages=messages)
    assert decision.input_tokens is not None and decision.input_tokens > 10


def test_two_tiers_map_medium_to_the_cheap_one() -> None:
    router = Router({"cheap": "gpt-4o-mini", "strong": "gpt-4o"})
    assert router.levels == {"low": "cheap", "medium": "cheap", "high": "strong"}
    assert router.route("x", task_type="summarization").model == "gpt-4o-mini"
    assert router.route("x", task_type="code_review").model == "gpt-4o"


@pytest.mark.parametrize("kwargs, match", [
    ({"tiers": {}}, "at least one tier"),
    ({"tiers": {"low": []}}, "one or more model names"),
    ({"tiers": TIERS, "fastest_tier": "turbo"}, "fastest_tier 'turbo'"),
    ({"tiers": TIERS, "budget_threshold": 1.5}, "budget_threshold"),
    ({"tiers": TIERS, "complexity_thresholds": (0.8, 0.2)}, "complexity_thresholds"),
    ({"tiers": TIERS, "levels": {"high": "nope"}}, "unknown tier 'nope'"),
])
def test_bad_configuration_is_a_typed_error(kwargs, match) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Router(**kwargs)


def test_unknown_model_in_a_tier_is_named() -> None:
    with pytest.raises(UnknownModelError, match="gpt-9"):
        Router({"low": "gpt-9"})


def test_custom_catalog_models_route(tmp_path) -> None:
    catalog = PriceCatalog.bundled()
    catalog.register({"name": "tiny-local", "provider": "local", "mode": "chat",
                      "input_per_mtok": "0", "output_per_mtok": "0", "context_window": 2048})
    router = Router({"low": "tiny-local", "high": "gpt-4o"}, catalog=catalog)
    assert router.route("hi").model == "tiny-local"
    assert router.route("word " * 3000).model == "gpt-4o"


def test_bad_route_arguments(router: Router) -> None:
    with pytest.raises(ConfigurationError):
        router.route("a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(ConfigurationError):
        router.route("a", max_output_tokens=-1)


def test_real_budget_pressure_from_the_engine(tmp_path) -> None:
    from budgetkit import Budget

    with Engine(db=str(tmp_path / "b.db")) as engine:
        engine.add_budget(Budget(limit=1.00, name="alice-daily", scope="user", match="alice"))
        router = Router(TIERS, engine=engine)
        assert router.route("hi", task_type="code_review", user_id="alice").model == "gpt-4o"
        # spend 85% of alice's budget: 85,000 output tokens of gpt-4o at $10 / 1M
        ticket = engine.admit("gpt-4o", input_tokens=0, max_output_tokens=85_000,
                              user_id="alice")
        engine.settle(ticket, input_tokens=0, output_tokens=85_000)
        decision = router.route("hi", task_type="code_review", user_id="alice")
        assert decision.model == "gpt-4.1-mini"
        assert "budget headroom 15% < 20%" in decision.reason
        # another user's calls are not under pressure
        assert router.route("hi", task_type="code_review", user_id="bob").model == "gpt-4o"


def test_calibrate_sets_thresholds_from_sample_prompts() -> None:
    router = Router({"cheap": "gpt-4o-mini", "strong": "gpt-4o"})
    prompts = ["hi"] * 6 + ["Explain why, step by step"] * 2 + [
        "Explain why and compare the trade-offs; prove it; you must be rigorous"] * 2
    medium, high = router.calibrate(prompts, high_share=0.2)
    assert 0.0 < high <= 1.0 and medium == high
    routed = [router.route(p).model for p in prompts]
    assert routed.count("gpt-4o") == 2
    router.calibrate(prompts, high_share=0.4)
    assert [router.route(p).model for p in prompts].count("gpt-4o") == 4
    router.calibrate(prompts, high_share=0.0)
    assert all(router.route(p).model == "gpt-4o-mini" for p in prompts)
    with pytest.raises(ConfigurationError):
        router.calibrate(prompts, high_share=0.8, medium_share=0.5)
    with pytest.raises(ConfigurationError):
        router.calibrate([], high_share=0.1)
