"""Leases: a busy window is admitted from room reserved ahead, without a database trip per
call, and every promise of the budget book still holds (see budgetkit.budgets._lease).

Real SQLite files (and PostgreSQL when BUDGETKIT_TEST_POSTGRES_URL is set); an injected
clock. The test model costs $1 per million input tokens and $2 per million output tokens.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest

from budgetkit import Budget, BudgetExceeded, BudgetLevels, Engine
from budgetkit.budgets._lease import LEASE_AFTER, LEASE_TIMEOUT

MODEL = "unit-model"
WORST = 1_000 * 1_000 + 500 * 2_000  # 1,000 prompt + 500 max output tokens: $0.002


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
        return str(tmp_path / "leases.db")
    return request.getfixturevalue("pg_url")


def count_transactions(engine: Engine) -> list[int]:
    """Counts the budget book's database transactions from now on."""
    book = engine._budgets
    calls = [0]
    original = book._driver.transaction

    def counted():
        calls[0] += 1
        return original()

    book._driver.transaction = counted
    return calls


def call(engine: Engine, actual_output: int = 100, **attribution: object):
    ticket = engine.admit(MODEL, input_tokens=1_000, max_output_tokens=500, **attribution)
    return engine.settle(ticket, input_tokens=1_000, output_tokens=actual_output)


def test_a_busy_window_admits_from_its_lease_without_a_trip_per_call(db):
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        for _ in range(LEASE_AFTER):  # busy: reserved one by one, then a lease is taken
            call(engine)
        trips = count_transactions(engine)
        for _ in range(200):
            call(engine)
        assert trips[0] <= 3  # a lease of ~100 calls, topped up once or twice
        engine.flush()
        (status,) = engine.budget_status("day")
        # every call's actual cost reached the window; the lease's unused room is back
        assert status.used == pytest.approx((LEASE_AFTER + 200) * 0.0012)
        assert status.reserved == 0


def test_leased_calls_count_in_every_budget_and_judge_levels(db):
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=1.0,
                                 levels=BudgetLevels(moderate=0.1, high=0.9)))
        engine.add_budget(Budget(name="alice", limit=50.0, scope="user"))
        tickets = []
        for _ in range(LEASE_AFTER + 100):
            ticket = engine.admit(MODEL, input_tokens=1_000, max_output_tokens=500,
                                  user_id="alice")
            tickets.append(ticket)
            engine.settle(ticket, input_tokens=1_000, output_tokens=100)
        assert all(reservation.leased for reservation in tickets[-1].reservations)
        assert tickets[-1].decision == "warn"  # past 10 % of $1 (0.13 used)
        engine.flush()
        by_name = {status.budget: status for status in engine.budget_status()}
        expected = (LEASE_AFTER + 100) * 0.0012
        assert by_name["day"].used == pytest.approx(expected)
        assert by_name["alice"].used == pytest.approx(expected)
        assert by_name["day"].reserved == by_name["alice"].reserved == 0


def test_near_the_limit_every_call_is_reserved_exactly_and_nothing_is_left_unused(db):
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=0.10))
        spent = 0
        while True:
            try:
                record = call(engine, actual_output=500)  # actual = worst case: $0.002
            except BudgetExceeded:
                break
            spent += record.cost_nanos
        engine.flush()
        (status,) = engine.budget_status("day")
        assert spent <= 100_000_000  # never over the limit
        assert 100_000_000 - spent < WORST  # and not more than one call's worst case short
        assert status.used == pytest.approx(spent / 1e9) and status.reserved == 0


def test_two_engines_on_one_database_never_overspend_with_leases(db):
    clock = Clock()
    limit_nanos = 200_000_000  # $0.20: ~100 calls at their worst case, ~166 actual
    with make_engine(db, clock) as first, make_engine(db, clock) as second:
        for engine in (first, second):
            engine.add_budget(Budget(name="shared", limit=0.20, period="total"))
        spent = [0, 0]
        errors: list[BaseException] = []

        def worker(index: int, engine: Engine) -> None:
            try:
                while True:
                    try:
                        record = call(engine, actual_output=200)
                    except BudgetExceeded as blocked:
                        if blocked.reserved == 0:
                            return
                        engine.flush()  # others' in flight: their actuals may leave room
                        continue
                    spent[index] += record.cost_nanos
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(index % 2, engine))
                   for index, engine in enumerate((first, second, first, second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors
        total = sum(spent)
        assert total <= limit_nanos
        assert limit_nanos - total < WORST
        first.flush()
        second.flush()
        (status,) = first.budget_status("shared")
        assert status.used == pytest.approx(total / 1e9) and status.reserved == 0


def test_a_dead_processes_lease_expires(db):
    clock = Clock()
    with make_engine(db, clock) as engine:
        engine.add_budget(Budget(name="day", limit=1.0))
        for _ in range(LEASE_AFTER + 1):
            call(engine)
        book = engine._budgets
        lease = next(iter(book._desk._leases.values()))
        assert lease.held > 0
        # the process "dies": its lease row stays, nobody syncs it
        book._desk._leases.clear()
        book._desk.any_active = False
        (status,) = engine.budget_status("day")
        assert status.reserved > 0
        clock.now += dt.timedelta(seconds=LEASE_TIMEOUT + 1)
        assert engine.reclaim_reservations() > 0
        (status,) = engine.budget_status("day")
        assert status.reserved == 0


def test_leases_can_be_switched_off(db):
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        engine._budgets.leases = False
        trips = count_transactions(engine)
        for _ in range(LEASE_AFTER + 20):
            call(engine)
        assert trips[0] >= LEASE_AFTER + 20  # one reservation per call


def test_leased_admits_need_no_token_count_and_near_the_limit_count_exactly(db):
    messages = [{"role": "user", "content": "What is the capital of France? " * 20}]
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        for _ in range(LEASE_AFTER + 1):
            engine.settle(engine.admit(MODEL, messages=messages, max_output_tokens=500),
                          input_tokens=200, output_tokens=10)
        leased = engine.admit(MODEL, messages=messages, max_output_tokens=500)
        assert leased.reservations[0].leased and not leased.input_counted
        exact_count = engine.count_message_tokens(messages, MODEL)
        # the lease holds the bound's worst case, which is never below the counted one
        assert leased.reservations[0].amount >= (exact_count * 1_000 + 500 * 2_000)
        engine.settle(leased, input_tokens=200, output_tokens=10)
        engine._budgets.leases = False
        engine.flush()  # leases given back: the next call is reserved exactly
        exact = engine.admit(MODEL, messages=messages, max_output_tokens=500)
        assert not exact.reservations[0].leased
        assert exact.reservations[0].amount == exact_count * 1_000 + 500 * 2_000


def test_a_lease_running_low_is_topped_up_off_the_calling_thread(db):
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=1_000.0))
        book = engine._budgets
        original = book._driver.transaction
        threads: list[str] = []

        def counted():
            threads.append(threading.current_thread().name)
            return original()

        book._driver.transaction = counted
        for _ in range(5_000):  # five leases' worth of calls
            call(engine)
        engine.flush()
        on_caller = threads.count(threading.current_thread().name)
        in_background = threads.count("budgetkit-settler")
        # the first calls (reserved one by one, then the first lease and a few races with
        # the settler) happen on the caller; the refills do not
        assert in_background >= 1
        assert on_caller <= LEASE_AFTER + 5


def test_a_small_budget_is_not_synced_on_every_call(db):
    """Leases of a small budget are small (an eighth of the spare room): each is refilled
    when half of it is used, not after every call."""
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="small", limit=2.0))  # ~110 calls' worth per lease
        trips = count_transactions(engine)
        for _ in range(600):
            call(engine)
        engine.flush()
        assert trips[0] < 600 / 5


def test_a_leased_stream_grows_from_its_lease_and_is_cut_when_the_window_is_full(db):
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=1.0, stop_streams=True))
        for _ in range(LEASE_AFTER + 1):
            call(engine)
        ticket = engine.admit(MODEL, input_tokens=1_000, max_output_tokens=500)
        (reservation,) = ticket.reservations
        assert reservation.leased
        before = reservation.amount
        engine.check_stream(ticket, 800)  # past its worst case: the lease has room
        assert reservation.amount > before
        with pytest.raises(BudgetExceeded):
            engine.check_stream(ticket, 10_000_000)  # $20 of output: no window has that
        engine.settle(ticket, input_tokens=1_000, output_tokens=800)
        engine.flush()
        (status,) = engine.budget_status("day")
        expected = (LEASE_AFTER + 1) * 0.0012 + (1_000 * 1_000 + 800 * 2_000) / 1e9
        assert status.used == pytest.approx(expected) and status.reserved == 0


def test_async_calls_admitted_from_leases_stay_on_the_event_loop(db):
    import asyncio

    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))

        async def main() -> int:
            loop = asyncio.get_running_loop()
            hops = [0]
            run_in_executor = loop.run_in_executor

            def counted(*args, **kwargs):
                hops[0] += 1
                return run_in_executor(*args, **kwargs)

            loop.run_in_executor = counted  # type: ignore[method-assign]
            for _ in range(LEASE_AFTER + 100):
                ticket = await engine.aadmit(MODEL, input_tokens=1_000, max_output_tokens=500)
                await engine.asettle(ticket, input_tokens=1_000, output_tokens=100)
            return hops[0]

        hops = asyncio.run(main())
        engine.flush()
        (status,) = engine.budget_status("day")
    # the first calls (reserved one by one) and the first lease go to a thread, no more
    assert hops <= LEASE_AFTER + 2
    assert status.used == pytest.approx((LEASE_AFTER + 100) * 0.0012)


def test_leased_spend_crossing_a_threshold_alerts_within_moments_not_at_the_next_sync(db):
    import time

    alerts = []
    with make_engine(db, Clock()) as engine:
        # a lease holds ~1,000 calls here: neither a top-up nor a sync is near at $0.10
        engine.add_budget(Budget(name="day", limit=20.0, alert_at=(0.005, 0.5)))
        engine.configure_budgets(alert_sinks=[alerts.append])
        calls = 0
        while not any(alert.threshold == 0.005 for alert in alerts):
            call(engine)  # $0.0012 each: $0.10 is reached by the 84th call
            calls += 1
            assert calls < 200, "no alert at $0.10"
            if calls > 84:
                time.sleep(0.005)  # the settler moves the spend and fires the alert
        assert 80 <= calls <= 150  # when spend crossed $0.10, not a second or a lease later
        (alert,) = [item for item in alerts if item.threshold == 0.005]
        assert alert.spent >= 0.1


def test_flush_keeping_leases_settles_spend_and_needs_no_new_lease(db):
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=100.0))
        for _ in range(LEASE_AFTER + 2):
            call(engine)
        engine.flush(return_leases=False)  # e.g. an app that flushes after every request
        [lease] = engine._budgets._desk._leases.values()
        assert lease.active and lease.held > 0 and lease.spent == 0  # spend moved in
        trips = count_transactions(engine)
        for _ in range(20):
            call(engine)
        engine.usage()  # reading rows keeps the leases too
        for _ in range(20):
            call(engine)
        assert trips[0] <= 2  # the syncs of those two reads; no exact admits, no re-lease
        engine.flush()  # the default gives the room back: status is exact
        (status,) = engine.budget_status("day")
        assert status.used == pytest.approx((LEASE_AFTER + 42) * 0.0012)
        assert status.reserved == 0


def test_headroom_leaves_leases_alone_and_ignores_their_unused_room(db):
    with make_engine(db, Clock()) as engine:
        engine.add_budget(Budget(name="day", limit=1.0))
        for _ in range(LEASE_AFTER + 2):
            call(engine)
        [lease] = engine._budgets._desk._leases.values()
        assert lease.room > 0
        spent = (LEASE_AFTER + 2) * 1_200_000  # nano-dollars
        headroom = engine.budget_headroom(model=MODEL)
        assert headroom == pytest.approx((1e9 - spent) / 1e9)
        assert lease.active and lease.room > 0  # not given back
