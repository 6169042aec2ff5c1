"""Cascade checks that need the question: agreement of two cheap answers, the learned
scorer's estimate, a verifier model; composed with the text checks."""

from __future__ import annotations

import asyncio

import pytest

from budgetkit import Cascade, ConfigurationError, Engine, MinLength
from budgetkit.routing import Agreement, ScorerCheck, Verifier, default_scorer, final_answer

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"


def test_final_answer_compares_numbers_or_normalised_text() -> None:
    assert final_answer("so 3 + 4 = 7.\n#### 1,200") == final_answer("The answer is 1200")
    assert final_answer("x = 5 then 2x = 10") == final_answer("10")
    assert final_answer("Paris!") == final_answer("  paris ")
    assert final_answer("Paris") != final_answer("Lyon")


def test_agreement_passes_when_a_second_sample_agrees() -> None:
    asked: list[str] = []

    def resample(prompt: str) -> str:
        asked.append(prompt)
        return "Let me redo it: 6 * 7 = 42. The answer is 42."

    check = Agreement(resample)
    assert check("#### 42", "What is 6 * 7?") is None
    failure = check("#### 41", "What is 6 * 7?")
    assert failure is not None and "disagrees" in failure and "41" in failure
    assert asked == ["What is 6 * 7?"] * 2


def test_agreement_with_a_custom_comparison() -> None:
    check = Agreement(lambda p: "YES", same=lambda a, b: a.lower() == b.lower())
    assert check("yes", "q") is None and check("no", "q") is not None


def test_verifier_asks_with_question_and_answer_and_needs_a_yes() -> None:
    seen: list[str] = []

    def ask(text: str) -> str:
        seen.append(text)
        return replies.pop(0)

    replies = ["YES. It is right.", "No, 6 * 7 is 42.", "Maybe?"]
    check = Verifier(ask)
    assert check("42", "What is 6 * 7?") is None
    assert "What is 6 * 7?" in seen[0] and "42" in seen[0]
    assert "did not confirm" in (check("41", "What is 6 * 7?") or "")
    assert check("42", "What is 6 * 7?") is not None  # an unclear verdict is no acceptance


def test_scorer_check_on_prompt_answer_or_both() -> None:
    shipped = ScorerCheck()
    assert shipped.threshold == default_scorer().threshold
    assert shipped("ok", "hi") is None
    assert "estimated P(wrong)" in (shipped("ok", "word " * 800) or "")
    wrong = ["I am not sure, maybe 12?", "It might be around 7, hard to say."] * 10
    right = ["The total is 12 apples.", "So she pays 7 dollars."] * 10
    answers = default_scorer().fit(wrong + right, [True] * 20 + [False] * 20)
    on_answer = ScorerCheck(answers, on="answer")
    assert on_answer.needs_prompt is False
    assert on_answer("Maybe 5, I am not sure.") is not None
    assert on_answer("The total is 5 apples.") is None


@pytest.mark.parametrize("make, match", [
    (lambda: Agreement("not callable"), "callable"),  # type: ignore[arg-type]
    (lambda: Verifier(lambda t: "yes", template="no placeholders"), "{prompt}"),
    (lambda: Verifier(lambda t: "yes", accept="("), "invalid accept"),
    (lambda: ScorerCheck(on="everything"), "on must be"),
    (lambda: ScorerCheck(threshold=1.5), "threshold"),
    (lambda: ScorerCheck(scorer="x"), "Scorer"),  # type: ignore[arg-type]
])
def test_bad_check_configuration_is_a_typed_error(make, match) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make()


def test_checks_compose_and_the_failure_is_the_escalation_reason(tmp_path) -> None:
    answers = {CHEAP: "#### 41", STRONG: "#### 42"}
    samples = iter(["#### 41", "#### 40", "#### 42"])  # the last model is checked too
    cascade_checks = [MinLength(3), Agreement(lambda p: next(samples))]
    with Engine(db=str(tmp_path / "usage.db")) as engine:
        cascade = Cascade([CHEAP, STRONG], cascade_checks, engine=engine)
        first = cascade.run(lambda m: answers[m], prompt="What is 6 * 7?")
        assert first.model == CHEAP and first.accepted  # the two cheap samples agree
        second = cascade.run(lambda m: answers[m], prompt="What is 6 * 7?")
        assert second.model == STRONG
        rows = [r for r in engine.usage() if r.request_id == second.request_id]
        escalation = next(r for r in rows if r.attempt == 2)
        assert "a second cheap answer disagrees" in (escalation.route_reason or "")
        assert escalation.route_reason.startswith("cascade attempt 2/2: gpt-4o-mini")


def test_a_prompt_check_without_a_prompt_is_a_typed_error() -> None:
    cascade = Cascade([CHEAP, STRONG], [Verifier(lambda t: "yes")])
    with pytest.raises(ConfigurationError, match="needs the prompt"):
        cascade.run(lambda m: "answer")
    assert cascade.run(lambda m: "answer", prompt="q").accepted


def test_async_cascade_passes_the_prompt_from_messages() -> None:
    seen: list[str] = []

    def ask(text: str) -> str:
        seen.append(text)
        return "no"

    async def call(model: str) -> str:
        return f"answer from {model}"

    cascade = Cascade([CHEAP, STRONG], [Verifier(ask)])
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a prime above 10."}]
    result = asyncio.run(cascade.arun(call, messages=messages))
    assert result.model == STRONG and not result.accepted
    assert "Name a prime above 10." in seen[0] and "Be brief." in seen[0]
