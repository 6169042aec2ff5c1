"""Cascade: checks, escalation, best effort, one usage row per attempt."""

from __future__ import annotations

import asyncio

import pytest

from budgetkit import (Budget, BudgetExceeded, Cascade, ConfigurationError, Engine, MinLength, UnknownModelError, ValidJSON)
from budgetkit.routing import Completion, MatchesRegex, RequiredElements, ScoreAtLeast

MODELS = ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]


@pytest.fixture
def engine(tmp_path):
    with Engine(db=str(tmp_path / "usage.db")) as eng:
        yield eng


def scripted(answers: dict[str, Completion | str]):
    calls: list[str] = []

    def call(model: str):
        calls.append(model)
        return answers[model]

    return call, calls


# ----------------------------------------------------------------------------- checks

def test_min_length() -> None:
    check = MinLength(5)
    assert check("hello") is None
    assert check("  hi  ") == "too short (2 < 5 chars)"


def test_required_elements_case_insensitive_by_default() -> None:
    assert RequiredElements("Paris", "France")("paris is in FRANCE") is None
    failure = RequiredElements(["Paris", "Berlin"])("Paris only")
    assert failure is not None and "'Berlin'" in failure and "'Paris'" not in failure
    assert RequiredElements("Paris", case_sensitive=True)("paris") is not None


def test_matches_regex_and_negation() -> None:
    assert MatchesRegex(r"#### -?\d+")("so #### 42") is None
    assert MatchesRegex(r"#### -?\d+")("about 42") is not None
    assert MatchesRegex(r"(?i)as an ai", negate=True)("As an AI I cannot") is not None
    with pytest.raises(ConfigurationError, match="invalid regex"):
        MatchesRegex("(")


def test_valid_json_plain_fenced_and_schema() -> None:
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "minLength": 1},
                             "age": {"type": "integer", "minimum": 0},
                             "tags": {"type": "array", "items": {"type": "string"},
                                      "maxItems": 2}}}
    check = ValidJSON(schema)
    assert check('{"name": "Ada", "age": 36}') is None
    assert check('```json\n{"name": "Ada", "age": 36}\n```') is None
    assert "not valid JSON" in check("{name: Ada}")
    assert "lacks required property 'age'" in check('{"name": "Ada"}')
    assert "expected integer" in check('{"name": "Ada", "age": "36"}')
    assert "unexpected property 'x'" in check('{"name": "Ada", "age": 1, "x": 1}')
    assert "below minimum" in check('{"name": "Ada", "age": -1}')
    assert "$.tags[1]" in check('{"name": "A", "age": 1, "tags": ["a", 2]}')
    assert "more than 2 items" in check('{"name": "A", "age": 1, "tags": ["a", "b", "c"]}')
    assert ValidJSON()("[1, 2]") is None
    assert ValidJSON(allow_fences=False)("```json\n{}\n```") is not None
    assert ValidJSON({"enum": ["yes", "no"]})('"maybe"') is not None


def test_valid_json_refuses_schema_keywords_it_cannot_enforce() -> None:
    with pytest.raises(ConfigurationError, match="pattern"):
        ValidJSON({"type": "string", "pattern": "^a"})
    with pytest.raises(ConfigurationError, match="unknown type"):
        ValidJSON({"type": "text"})


def test_score_at_least() -> None:
    check = ScoreAtLeast(lambda text: text.count("!") / 3, 0.5)
    assert check("wow!!") is None
    assert check("wow!") == "score 0.333 < threshold 0.5"


# ----------------------------------------------------------------------------- cascade

def test_first_passing_answer_is_accepted_without_escalation() -> None:
    call, calls = scripted({"gpt-4o-mini": "Paris is the capital of France."})
    result = Cascade(MODELS, [RequiredElements("Paris")]).run(call)
    assert calls == ["gpt-4o-mini"]
    assert result.accepted and result.model == "gpt-4o-mini" and result.escalations == 0
    assert result.text.startswith("Paris")


def test_escalates_until_an_answer_passes() -> None:
    call, calls = scripted({"gpt-4o-mini": "idk", "gpt-4.1-mini": "{bad json",
                            "gpt-4o": '{"answer": 4}'})
    result = Cascade(MODELS, [ValidJSON({"required": ["answer"]})]).run(call)
    assert calls == MODELS
    assert result.accepted and result.model == "gpt-4o"
    assert [a.passed for a in result.attempts] == [False, False, True]
    assert "not valid JSON" in result.attempts[0].failures[0]
    assert "gpt-4o-mini answer failed: not valid JSON" in result.attempts[1].reason


def test_last_answer_is_best_effort_when_nothing_passes() -> None:
    call, _ = scripted({m: "no" for m in MODELS})
    result = Cascade(MODELS, [MinLength(10)]).run(call)
    assert not result.accepted and result.model == "gpt-4o" and result.text == "no"
    assert len(result.attempts) == 3


def test_each_attempt_is_its_own_usage_row(engine: Engine) -> None:
    call, _ = scripted({
        "gpt-4o-mini": Completion("short", input_tokens=12, output_tokens=2),
        "gpt-4.1-mini": "A long enough answer from the middle model.",
    })
    cascade = Cascade(MODELS, [MinLength(20)], engine=engine, max_output_tokens=64)
    result = cascade.run(call, prompt="Say something long", request_id="req-1",
                         user_id="alice")
    rows = sorted(engine.usage(request_id="req-1"), key=lambda r: r.attempt)
    assert [(r.model, r.attempt, r.user_id) for r in rows] == [
        ("gpt-4o-mini", 1, "alice"), ("gpt-4.1-mini", 2, "alice")]
    assert rows[0].input_tokens == 12 and rows[0].output_tokens == 2
    assert rows[0].usage_source == "provider"
    assert rows[1].usage_source == "estimated"  # the call reported no usage
    assert rows[1].input_tokens == engine.count_tokens("Say something long", "gpt-4.1-mini")
    assert rows[1].output_tokens == engine.count_tokens(result.text, "gpt-4.1-mini")
    assert rows[0].route_reason == "cascade attempt 1/3: cheapest first"
    assert "too short" in rows[1].route_reason
    assert result.cost_nanos == sum(r.cost_nanos for r in rows) > 0


def test_a_failing_call_releases_its_ticket_and_raises(engine: Engine) -> None:
    def call(model: str) -> str:
        raise RuntimeError("provider down")

    with pytest.raises(RuntimeError):
        Cascade(MODELS, engine=engine).run(call, prompt="hi", request_id="req-err")
    rows = engine.usage(request_id="req-err")
    assert len(rows) == 1 and rows[0].status == "error" and rows[0].cost_nanos == 0
    assert rows[0].error_type == "RuntimeError"


def block_model(engine: Engine, model: str) -> None:
    """A real budget so small that any call to ``model`` is refused before it runs."""
    engine.add_budget(Budget(limit=0.000001, name=f"cap-{model}", scope="model", match=model,
                             require_approval=False))


def test_budget_blocking_an_escalation_returns_the_answer_in_hand(engine: Engine) -> None:
    block_model(engine, "gpt-4o")
    call, calls = scripted({"gpt-4o-mini": "no", "gpt-4.1-mini": "still no"})
    result = Cascade(MODELS, [MinLength(10)], engine=engine).run(call, prompt="q",
                                                                  request_id="r")
    assert calls == ["gpt-4o-mini", "gpt-4.1-mini"]
    assert not result.accepted and result.text == "still no"
    assert isinstance(result.stopped_by, BudgetExceeded)
    statuses = sorted((r.attempt, r.status) for r in engine.usage(request_id="r"))
    assert statuses == [(1, "ok"), (2, "ok"), (3, "blocked")]


def test_budget_blocking_the_first_attempt_raises(engine: Engine) -> None:
    block_model(engine, "gpt-4o")
    call, calls = scripted({})
    with pytest.raises(BudgetExceeded):
        Cascade(["gpt-4o"], engine=engine).run(call, prompt="q")
    assert calls == []


def test_async_cascade(engine: Engine) -> None:
    async def call(model: str) -> str:
        await asyncio.sleep(0)
        return "ok" if model == "gpt-4o-mini" else "a much longer answer here"

    result = asyncio.run(Cascade(MODELS, [MinLength(5)], engine=engine).arun(
        call, messages=[{"role": "user", "content": "hi"}], request_id="a1"))
    assert result.model == "gpt-4.1-mini" and result.accepted
    assert sorted(r.attempt for r in engine.usage(request_id="a1")) == [1, 2]


def test_bad_cascade_configuration(engine: Engine) -> None:
    with pytest.raises(ConfigurationError):
        Cascade([])
    with pytest.raises(ConfigurationError, match="repeat"):
        Cascade(["gpt-4o", "gpt-4o"])
    with pytest.raises(ConfigurationError, match="not callable"):
        Cascade(MODELS, ["nope"])  # type: ignore[list-item]
    with pytest.raises(UnknownModelError):
        Cascade(["gpt-9"], engine=engine)
    with pytest.raises(ConfigurationError, match="Completion or a str"):
        Cascade(MODELS).run(lambda model: 42)  # type: ignore[arg-type,return-value]
