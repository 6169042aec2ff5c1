"""Fallback: retries with backoff and jitter, cooldown, context escalation, budget stops."""

from __future__ import annotations

import asyncio

import pytest

from budgetkit import (BudgetExceeded, ConfigurationError, ContextWindowExceeded, Fallback,
                       default_catalog)
from budgetkit.routing._fallback import (is_context_length_error, is_rate_limit, is_server_error,
                                 is_timeout)


class RateLimitError(Exception):
    status_code = 429


class APIStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status_code = status


class BadRequestError(Exception):
    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(models=("gpt-4o-mini", "gpt-4o"), **kwargs):
    sleeps: list[float] = []
    clock = FakeClock()
    fallback = Fallback(list(models), sleep=sleeps.append, random=lambda: 0.5, clock=clock,
                        catalog=default_catalog(), **kwargs)
    return fallback, sleeps, clock


def script(outcomes: dict[str, list]):
    """fn(model) raising or returning the next scripted outcome for that model."""
    calls: list[str] = []

    def fn(model: str):
        calls.append(model)
        outcome = outcomes[model].pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return fn, calls


def test_classifiers() -> None:
    assert is_rate_limit(RateLimitError()) and not is_rate_limit(APIStatusError(500))
    assert is_server_error(APIStatusError(503)) and not is_server_error(APIStatusError(400))
    assert is_server_error(ConnectionResetError())
    assert is_timeout(TimeoutError()) and is_timeout(asyncio.TimeoutError())
    assert is_context_length_error(BadRequestError("x", code="context_length_exceeded"))
    assert is_context_length_error(BadRequestError(
        "This model's maximum context length is 8192 tokens"))
    assert is_context_length_error(ContextWindowExceeded("too long"))
    assert not is_context_length_error(BadRequestError("invalid api key"))


def test_transient_error_is_retried_with_exponential_backoff_and_jitter() -> None:
    fallback, sleeps, _ = make(max_retries=3, base_delay=1.0, jitter=0.5)
    fn, calls = script({"gpt-4o-mini": [RateLimitError(), APIStatusError(502),
                                        TimeoutError(), "ok"]})
    assert fallback.call(fn) == "ok"
    assert calls == ["gpt-4o-mini"] * 4
    # base * 2**n, scaled by (1 - jitter * random) = 0.75
    assert sleeps == [0.75, 1.5, 3.0]


def test_delay_is_capped_and_full_jitter_can_reach_zero() -> None:
    fallback = Fallback(["gpt-4o"], base_delay=1.0, max_delay=5.0, jitter=1.0,
                        random=lambda: 0.0)
    assert fallback.delay(10) == 5.0
    assert Fallback(["gpt-4o"], jitter=1.0, random=lambda: 1.0).delay(3) == 0.0


def test_exhausted_retries_fall_back_and_cool_the_model_down() -> None:
    fallback, sleeps, clock = make(max_retries=1, cooldown=60.0)
    fn, calls = script({"gpt-4o-mini": [APIStatusError(500), APIStatusError(500)],
                        "gpt-4o": ["strong", "strong again", "strong 3"]})
    assert fallback.call(fn) == "strong"
    assert calls == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]
    assert list(fallback.cooling_down()) == ["gpt-4o-mini"]
    # during the cooldown the failing model is skipped without a call
    clock.now += 30
    assert fallback.call(fn) == "strong again"
    assert calls[-1] == "gpt-4o" and calls.count("gpt-4o-mini") == 2
    # after it, the model is tried again first
    clock.now += 31
    fn2, calls2 = script({"gpt-4o-mini": ["cheap"]})
    assert fallback.call(fn2) == "cheap" and calls2 == ["gpt-4o-mini"]


def test_all_models_cooling_down_are_still_tried_soonest_first() -> None:
    fallback, _, clock = make(max_retries=0, cooldown=60.0)
    fn, _ = script({"gpt-4o-mini": [APIStatusError(500)], "gpt-4o": [APIStatusError(500)]})
    with pytest.raises(APIStatusError):
        fallback.call(fn)
    assert fallback.plan() == ["gpt-4o-mini", "gpt-4o"]
    fallback.reset("gpt-4o")
    assert fallback.plan() == ["gpt-4o"]


def test_budget_exceeded_is_never_retried_nor_fallen_back() -> None:
    fallback, sleeps, _ = make(retry_on=(Exception,), fallback_on=(Exception,))
    fn, calls = script({"gpt-4o-mini": [BudgetExceeded("daily budget")], "gpt-4o": ["x"]})
    with pytest.raises(BudgetExceeded):
        fallback.call(fn)
    assert calls == ["gpt-4o-mini"] and sleeps == []
    assert fallback.cooling_down() == {}


def test_unclassified_errors_are_raised_at_once() -> None:
    fallback, sleeps, _ = make()
    fn, calls = script({"gpt-4o-mini": [BadRequestError("invalid api key")], "gpt-4o": ["x"]})
    with pytest.raises(BadRequestError):
        fallback.call(fn)
    assert calls == ["gpt-4o-mini"] and sleeps == []


def test_context_length_error_skips_to_a_larger_window_without_retry() -> None:
    # gpt-4 (8k) -> gpt-4-32k (32k) -> gpt-4o (128k); gpt-3.5-turbo-0613 (4k) is smaller
    fallback, sleeps, _ = make(models=("gpt-4", "gpt-3.5-turbo-0613", "gpt-4o"))
    fn, calls = script({"gpt-4": [BadRequestError("maximum context length is 8192 tokens")],
                        "gpt-4o": ["fits"]})
    assert fallback.call(fn) == "fits"
    assert calls == ["gpt-4", "gpt-4o"] and sleeps == []
    assert fallback.cooling_down() == {}  # the model is fine, the prompt was too long


def test_custom_exception_types_and_predicates() -> None:
    class Flaky(Exception):
        pass

    fallback, sleeps, _ = make(retry_on=(Flaky,), fallback_on=(lambda e: "down" in str(e),),
                               max_retries=1)
    fn, calls = script({"gpt-4o-mini": [Flaky(), Flaky("down")], "gpt-4o": ["ok"]})
    assert fallback.call(fn) == "ok"
    assert calls == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"] and len(sleeps) == 1


def test_every_model_failing_raises_the_last_error_with_a_trail() -> None:
    fallback, _, _ = make(max_retries=0)
    fn, _ = script({"gpt-4o-mini": [RateLimitError()], "gpt-4o": [APIStatusError(503)]})
    with pytest.raises(APIStatusError) as info:
        fallback.call(fn)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "gpt-4o-mini#0: RateLimitError" in notes


def test_prefer_puts_a_model_first() -> None:
    fallback, _, _ = make()
    assert fallback.plan(prefer="gpt-4o") == ["gpt-4o", "gpt-4o-mini"]


def test_on_error_hook_sees_each_failure() -> None:
    seen = []
    fallback, _, _ = make(max_retries=1, on_error=seen.append)
    fn, _ = script({"gpt-4o-mini": [RateLimitError(), RateLimitError()], "gpt-4o": ["ok"]})
    fallback.call(fn)
    assert [(a.model, a.retry, a.action) for a in seen] == [
        ("gpt-4o-mini", 0, "retry"), ("gpt-4o-mini", 1, "fallback")]


def test_async_call_uses_the_async_sleep() -> None:
    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    fallback = Fallback(["gpt-4o-mini", "gpt-4o"], asleep=asleep, random=lambda: 0.0,
                        base_delay=2.0, max_retries=1)
    outcomes = {"gpt-4o-mini": [RateLimitError(), RateLimitError()], "gpt-4o": ["ok"]}

    async def fn(model: str):
        outcome = outcomes[model].pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    assert asyncio.run(fallback.acall(fn)) == "ok"
    assert waits == [2.0]


@pytest.mark.parametrize("kwargs", [
    {"models": []}, {"models": ["a"], "max_retries": -1}, {"models": ["a"], "jitter": 2.0},
    {"models": ["a"], "cooldown": -1.0},
])
def test_bad_configuration(kwargs) -> None:
    with pytest.raises(ConfigurationError):
        Fallback(**kwargs)
