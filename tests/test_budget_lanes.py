"""Admission lanes: calls like an admitted one are admitted from leases without a ticket
first (see budgetkit.budgets._lane), and only when the full check would have said "allow".

Real SQLite files (and PostgreSQL when BUDGETKIT_TEST_POSTGRES_URL is set); an injected
clock. The test model costs $1 per million input tokens and $2 per million output tokens.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from pathlib import Path

import pytest

from budgetkit import Budget, BudgetExceeded, BudgetLevels, Engine
from budgetkit.budgets._lane import LANE_CALLS, _allow_limit
from budgetkit.budgets import LEASE_AFTER

MODEL = "unit-model"
PROMPT = [{"role": "user", "content": "How long does shipping take to Lisbon?"}]


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2025, 3, 14, 12, 0)

    def __call__(self) -> dt.datetime:
        return self.now


def make_engine(db: str, clock: Clock) -> Engine:
    engine = Engine(db=db, clock=clock)
    engine.catalog.register({"name": MODEL, "provider": "test", "mode": "chat",
                             "input_per_mtok": "1", "output_per_mtok": "2",
                             "context_window": 100_000, "max_output_tokens": 4_000})
    return engine


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "lanes.db")
    return request.getfixturevalue("pg_url")


def busy_lane(engine: Engine, **attribution: object):
    """Admit calls the ordinary way until the windows are leased; the lane of the last."""
    for _ in range(LEASE_AFTER + 2):
        ticket = engine.admit(MODEL, messages=PROMPT, max_output_tokens=500, **attribution)
        engine.settle(ticket, input_tokens=15, output_tokens=100)
    lane = engine.lane(ticket)
    assert lane is not None
    return lane


def lane_call(engine: Engine, lane, output_tokens: int = 100, **attribution: object):
    """One call admitted in ``lane`` (None when the lane declined), settled."""
    bound = engine.prompt_bound(MODEL, messages=PROMPT)
    held = lane.admit(bound, 500)
    if held is None:
        return None
    ticket = held.attach(engine.ticket(MODEL, messages=PROMPT, max_output_tokens=500,
                                      **attribution))
    return engine.settle(ticket, input_tokens=15, output_tokens=output_tokens)


def count_transactions(engine: Engine) -> list[int]:
    book = engine._budgets
    calls = [0]
    original = book._driver.transaction

    def counted():
        calls[0] += 1
        return original()

    book._driver.transaction = counted
    return calls


def test_lane_calls_need_no_trip_and_count_in_every_window(db):
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        engine.add_budget(Budget(name="alice", limit=100.0, scope="user", match="alice"))
        engine.add_budget(Budget(name="tokens", limit=10_000_000, unit="tokens",
                                 period="month"))
        lane = busy_lane(engine, user_id="alice")
        trips = count_transactions(engine)
        records = [lane_call(engine, lane, user_id="alice") for _ in range(300)]
        assert all(record is not None for record in records)
        assert trips[0] <= 3  # lease top-ups, not one trip per call
        engine.flush()
        calls = LEASE_AFTER + 2 + 300
        cost = 15 * 1 + 100 * 2  # micro-dollars per call
        status = {item.budget: item for item in engine.budget_status()}
        assert status["day"].used == pytest.approx(calls * cost / 1e6)
        assert status["alice"].used == pytest.approx(calls * cost / 1e6)
        assert status["tokens"].used == calls * 115
        assert all(item.reserved == 0 for item in status.values())
        assert len(engine.usage(user_id="alice")) == calls


def test_lane_reserves_what_the_full_check_would(tmp_path):
    with make_engine(str(tmp_path / "lanes.db"), Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        engine.add_budget(Budget(name="tokens", limit=10_000_000, unit="tokens"))
        lane = busy_lane(engine)
        rng = random.Random(7)
        for _ in range(200):
            messages = [{"role": "user", "content": "x" * rng.randrange(1, 5_000)}]
            bound = engine.prompt_bound(MODEL, messages=messages)
            output = rng.choice([None, rng.randrange(0, 4_000)])
            held = lane.admit(bound, output)
            ticket = engine.ticket(MODEL, messages=messages, max_output_tokens=output)
            assert held is not None
            usd, tokens = held.amounts
            assert usd == ticket.price.cost_nanos(bound, ticket.max_output_tokens)
            assert tokens == bound + ticket.max_output_tokens
            assert bound >= engine.count_message_tokens(messages, MODEL)
            held.give_back()
        engine.flush()  # returns the lane's credit with the leases' room
        desk = engine._budgets._desk
        assert all(lease.inflight == 0 for lease in desk._leases.values())
        assert all(status.reserved == 0 for status in engine.budget_status())


def test_most_lane_admits_only_use_credit_and_any_trip_returns_it(tmp_path, monkeypatch):
    with make_engine(str(tmp_path / "lanes.db"), Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        lane = busy_lane(engine)
        desk = engine._budgets._desk
        takes = []
        take_all = desk.take_all
        monkeypatch.setattr(desk, "take_all", lambda *a, **k: takes.append(1) or take_all(*a, **k))
        bound = engine.prompt_bound(MODEL, messages=PROMPT)
        helds = [lane.admit(bound, 500) for _ in range(5 * LANE_CALLS)]
        assert all(held is not None for held in helds)
        assert len(takes) == 5  # one trip to the leases per LANE_CALLS calls
        [lease] = desk._leases.values()
        assert lease.inflight == sum(held.amounts[0] for held in helds)  # no credit left
        extra = lane.admit(bound, 500)
        assert sum(lane.credit) > 0 and lease.inflight > sum(
            held.amounts[0] for held in [*helds, extra])
        engine._budgets._sync_leases()  # a trip (the sync every second) returns the credit
        assert lane.credit == [0]
        assert lease.inflight == sum(held.amounts[0] for held in [*helds, extra])
        for held in [*helds, extra]:
            held.give_back()
        assert lease.inflight == 0


def test_a_forked_child_does_not_use_its_parents_credit(tmp_path):
    import os

    with make_engine(str(tmp_path / "lanes.db"), Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        lane = busy_lane(engine)
        bound = engine.prompt_bound(MODEL, messages=PROMPT)
        lane.admit(bound, 500).give_back()
        assert sum(lane.credit) > 0
        pid = os.fork()
        if pid == 0:  # the child: the parent's leases and credit are the parent's
            code = 0 if lane.admit(bound, 500) is None and lane.credit == [0] else 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert lane.admit(bound, 500) is not None  # the parent's lane goes on


@pytest.mark.parametrize("budget", [
    Budget(name="default", limit=1.0),
    Budget(name="levels", limit=1.0, levels=BudgetLevels(0.5, 0.7, 0.9), downgrade_below=None),
    Budget(name="hint", limit=1.0, levels=BudgetLevels(0.9, 0.95), downgrade_below=0.3),
    Budget(name="tokens", limit=10_000, unit="tokens", downgrade_below=0.05),
])
def test_lane_limit_is_where_the_full_check_stops_allowing_silently(budget):
    limit = _allow_limit(budget)
    for used in range(limit - 3, limit + 1):
        assert budget.level_of(used) == "normal"
        if budget.downgrade_below is not None:
            remaining = max(0, budget.limit_amount - used) / budget.limit_amount
            assert remaining >= budget.downgrade_below
    assert budget.level_of(budget.level_amounts[0]) != "normal"
    assert limit < budget.level_amounts[0]


def test_lane_declines_a_call_that_would_reach_the_first_level_then_the_full_check_warns(tmp_path):
    with make_engine(str(tmp_path / "lanes.db"), Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=1.0, levels=BudgetLevels(0.5, 0.8, 1.0)))
        lane = busy_lane(engine)
        [lease] = engine._budgets._desk._leases.values()
        bound = engine.prompt_bound(MODEL, messages=PROMPT)
        worst = engine.catalog.get(MODEL).cost_nanos(bound, 500)
        spent, reserved = lease.state()
        # another process spent up to just below where this call would reach the level
        lease.seen_spent += lease.budget.level_amounts[0] - 1 - (spent + reserved) - worst
        held = lane.admit(bound, 500)
        assert held is not None  # it ends one nano-dollar below the level: allowed
        held.give_back()
        lease.seen_spent += 1
        assert lane.admit(bound, 500) is None  # it would reach the level
        ticket = engine.admit(MODEL, messages=PROMPT, max_output_tokens=500)
        assert ticket.decision == "warn" and ticket.warnings
        engine.release(ticket)


def test_lane_declines_when_budgets_change_or_the_window_ends(db):
    clock = Clock()
    with make_engine(db, clock) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        lane = busy_lane(engine)
        assert lane_call(engine, lane) is not None
        engine.add_budget(Budget(name="bob", limit=1.0, scope="user", match="bob"))
        assert lane_call(engine, lane) is None  # the registry changed: admit anew
        lane = busy_lane(engine)
        clock.now += dt.timedelta(days=1)
        assert lane_call(engine, lane) is None  # a new day: its window is another row
        lane = busy_lane(engine)
        assert lane_call(engine, lane) is not None
        engine.flush()
        (today,) = engine.budget_status("day")
        assert today.window_start == dt.datetime(2025, 3, 15)
        assert today.used == pytest.approx((LEASE_AFTER + 3) * 215e-6)
        assert today.reserved == 0


def test_no_lane_for_per_run_budgets_or_calls_outside_the_book(tmp_path):
    with make_engine(str(tmp_path / "lanes.db"), Clock()) as engine:
        ticket = engine.admit(MODEL, messages=PROMPT)
        assert engine.lane(ticket) is None  # no budgets at all
        engine.release(ticket)
        engine.add_budget(Budget(name="per-run", limit=1.0, period="run", scope="run"))
        ticket = engine.admit(MODEL, messages=PROMPT, run_id="r1")
        assert engine.lane(ticket) is None
        engine.release(ticket)


def test_threads_admitting_in_lanes_never_overspend(tmp_path):
    limit = 0.05
    with make_engine(str(tmp_path / "race.db"), Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=limit, require_approval=False))
        lane = busy_lane(engine)
        worst = engine.catalog.get(MODEL).cost_nanos(
            engine.prompt_bound(MODEL, messages=PROMPT), 500) / 1e9
        blocked, in_lane = [], []

        def work(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(400):
                output = rng.randrange(0, 501)
                if lane_call(engine, lane, output_tokens=output) is not None:
                    in_lane.append(seed)
                    continue
                try:
                    ticket = engine.admit(MODEL, messages=PROMPT, max_output_tokens=500)
                except BudgetExceeded:
                    blocked.append(seed)
                    return
                engine.settle(ticket, input_tokens=15, output_tokens=output)

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        engine.flush()
        (status,) = engine.budget_status("day")
        spent = sum(row.cost_nanos for row in engine.usage(status="ok")) / 1e9
        assert spent == pytest.approx(status.used)
        assert spent <= limit + 1e-12
        assert len(in_lane) >= 20 and blocked  # lanes were busy; the budget did run out
        assert limit - spent < worst + 1e-12  # and not much was left unused


def test_lanes_registry_is_bounded_and_takes_unhashable_keys(tmp_path):
    from budgetkit.budgets import Lanes

    with make_engine(str(tmp_path / "lanes.db"), Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        lanes = Lanes(engine, maxsize=2)
        ticket = engine.admit(MODEL, messages=PROMPT)
        for key in ("a", "b"):
            lanes.remember(key, ticket)
        assert lanes.get("a") is not None and lanes.get("b") is not None
        lanes.remember("c", ticket)  # full: starts afresh
        assert lanes.get("a") is None and lanes.get("c") is not None
        lanes.remember({"unhashable": 1}, ticket)  # ignored, not raised
        assert lanes.get({"unhashable": 1}) is None
        engine.release(ticket)
