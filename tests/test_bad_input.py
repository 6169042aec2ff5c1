"""Bad numbers at the call: NaN, infinities, negatives, fractions and non-numbers given as
token counts or amounts are refused with a ConfigurationError naming the argument, and
the ledger (usage rows, budget windows: used and reserved) is exactly as before.

Before these checks a NaN count was accepted, the row's cost became NaN and the database
refused the row later on the writer thread: the call vanished from the ledger.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from budgetkit import Budget, ConfigurationError, Engine
from budgetkit.pricing import token_count

BAD_COUNTS = [math.nan, math.inf, -math.inf, -1, 2.5, "12", None, True]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine(db=str(tmp_path / "bad.db")) as eng:
        eng.add_budget(Budget(limit=10.0, name="global-daily"))
        yield eng


def ledger_state(engine: Engine) -> tuple[list[Any], list[tuple[str, float, float]]]:
    """Every row and every budget window's used / reserved amounts."""
    rows = [(r.id, r.status, r.input_tokens, r.output_tokens, r.cost_nanos)
            for r in engine.usage()]
    windows = [(s.budget, s.used, s.reserved) for s in engine.budget_status()]
    return rows, windows


def open_ticket(engine: Engine) -> Any:
    return engine.admit("gpt-4o", input_tokens=100, max_output_tokens=50)


# Each case: (name of the argument the error must name, the call with ``bad`` in it).
Call = Callable[[Engine, Any, Any], object]
CASES: list[tuple[str, Call]] = [
    ("input_tokens", lambda e, t, bad: e.admit("gpt-4o", input_tokens=bad)),
    ("max_output_tokens",
     lambda e, t, bad: e.admit("gpt-4o", input_tokens=1, max_output_tokens=bad)),
    ("input_tokens", lambda e, t, bad: e.ticket("gpt-4o", input_tokens=bad)),
    ("max_output_tokens",
     lambda e, t, bad: e.ticket("gpt-4o", input_tokens=1, max_output_tokens=bad)),
    ("input_tokens", lambda e, t, bad: e.settle(t, input_tokens=bad)),
    ("output_tokens", lambda e, t, bad: e.settle(t, output_tokens=bad)),
    ("cached_input_tokens", lambda e, t, bad: e.settle(t, cached_input_tokens=bad)),
    ("cache_write_tokens", lambda e, t, bad: e.settle(t, cache_write_tokens=bad)),
    ("reasoning_tokens", lambda e, t, bad: e.settle(t, reasoning_tokens=bad)),
    ("input_tokens", lambda e, t, bad: e.release(t, input_tokens=bad)),
    ("output_tokens", lambda e, t, bad: e.release(t, output_tokens=bad)),
    ("input_tokens", lambda e, t, bad: e.record("gpt-4o", input_tokens=bad)),
    ("output_tokens", lambda e, t, bad: e.record("gpt-4o", input_tokens=1, output_tokens=bad)),
    ("cached_input_tokens",
     lambda e, t, bad: e.record("gpt-4o", input_tokens=1, cached_input_tokens=bad)),
    ("reasoning_tokens",
     lambda e, t, bad: e.record("gpt-4o", input_tokens=1, reasoning_tokens=bad)),
    ("saved_nanos", lambda e, t, bad: e.record("gpt-4o", input_tokens=1, status="cached",
                                               saved_nanos=bad)),
    ("input_tokens", lambda e, t, bad: e.estimate_cost("gpt-4o", bad)),
    ("output_tokens", lambda e, t, bad: e.estimate_cost("gpt-4o", 1, bad)),
    ("output_tokens_so_far", lambda e, t, bad: e.check_stream(t, bad)),
]


NONE_MEANS_DEFAULT = {call for _, call in CASES[:5]}


@pytest.mark.parametrize("bad", BAD_COUNTS, ids=repr)
@pytest.mark.parametrize("field, call", CASES,
                         ids=[f"{i}-{field}" for i, (field, _) in enumerate(CASES)])
def test_a_bad_count_is_refused_naming_the_argument_and_changes_nothing(
        engine: Engine, field: str, call: Call, bad: Any) -> None:
    if bad is None and call in NONE_MEANS_DEFAULT:
        pytest.skip("None means 'count the prompt' / 'the default' / 'as admitted' here")
    ticket = open_ticket(engine)
    before = ledger_state(engine)
    with pytest.raises(ConfigurationError, match=field) as info:
        call(engine, ticket, bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)
    assert ledger_state(engine) == before
    # The refused call left the ticket open: it still settles once, normally.
    assert engine.settle(ticket, input_tokens=100, output_tokens=10) is not None
    rows, _ = ledger_state(engine)
    assert len(rows) == len(before[0]) + 1


def test_the_refused_settle_keeps_the_reservation_and_a_good_one_replaces_it(
        engine: Engine) -> None:
    ticket = open_ticket(engine)
    reserved = engine.budget_status()[0].reserved
    assert reserved > 0
    with pytest.raises(ConfigurationError, match="output_tokens"):
        engine.settle(ticket, output_tokens=math.nan)
    assert engine.budget_status()[0].reserved == reserved
    engine.settle(ticket, input_tokens=100, output_tokens=10)
    status = engine.budget_status()[0]
    assert status.reserved == 0
    assert status.used == pytest.approx(engine.estimate_cost("gpt-4o", 100, 10))


@pytest.mark.parametrize("field, value", [("latency_ms", math.nan), ("latency_ms", math.inf),
                                          ("latency_ms", -1.0)])
def test_record_refuses_a_bad_latency(engine: Engine, field: str, value: float) -> None:
    before = ledger_state(engine)
    with pytest.raises(ConfigurationError, match=field):
        engine.record("gpt-4o", input_tokens=1, **{field: value})
    assert ledger_state(engine) == before


@pytest.mark.parametrize("kwargs, field", [
    ({"extra": math.nan}, "extra"), ({"extra": math.inf}, "extra"), ({"extra": -1.0}, "extra"),
    ({"expires": math.nan}, "expires"), ({"expires": math.inf}, "expires"),
])
def test_approve_refuses_a_bad_amount(engine: Engine, kwargs: dict[str, float],
                                      field: str) -> None:
    before = ledger_state(engine)
    with pytest.raises(ConfigurationError, match=field):
        engine.approve("global-daily", **kwargs)
    assert engine.approvals() == []
    assert ledger_state(engine) == before


def test_an_admission_lane_refuses_a_bad_output_limit(engine: Engine) -> None:
    ticket = engine.admit("gpt-4o", input_tokens=10, max_output_tokens=10)
    engine.settle(ticket, input_tokens=10, output_tokens=10)
    lane = engine.lane(ticket)
    if lane is None:
        pytest.skip("no lane for this budget")
    before = ledger_state(engine)
    with pytest.raises(ConfigurationError, match="max_output_tokens"):
        lane.admit(10, math.nan)  # type: ignore[arg-type]
    assert ledger_state(engine) == before


@pytest.mark.parametrize("value, expected", [(0, 0), (12, 12), (12.0, 12)])
def test_whole_numbers_are_accepted_as_counts(value: Any, expected: int) -> None:
    numpy = pytest.importorskip("numpy")
    assert token_count("input_tokens", value) == expected
    assert token_count("input_tokens", numpy.int64(7)) == 7


def test_a_whole_float_count_from_an_sdk_is_recorded_as_an_int(engine: Engine) -> None:
    record = engine.record("gpt-4o", input_tokens=12.0, output_tokens=3.0)  # type: ignore[arg-type]
    assert record.input_tokens == 12 and type(record.input_tokens) is int
    assert [r.input_tokens for r in engine.usage()] == [12]
