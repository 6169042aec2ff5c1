"""Budgets: definitions, levels, scopes, windows, approvals, files, presets, regressions.

Every test runs on a real SQLite file with an injected clock. The test model costs
$1 per million input tokens (1,000 nano-dollars a token) and $2 per million output tokens,
so amounts are easy to follow.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from budgetkit import (ApprovalRequired, Budget, BudgetExceeded, BudgetLevels, ConfigurationError, Engine, load_budgets, model_token_budgets, token_ladder_budgets)
from budgetkit.budgets import seed_budgets
from budgetkit.budgets._budget import window_bounds

MODEL = "unit-model"


class Clock:
    def __init__(self, start: dt.datetime = dt.datetime(2025, 3, 14, 12, 0)) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


def make_engine(db: Path, clock: Clock | None = None) -> Engine:
    engine = Engine(db=str(db), clock=clock or Clock())  # a path or a URL
    engine.catalog.register({"name": MODEL, "provider": "test", "mode": "chat",
                             "input_per_mtok": "1", "output_per_mtok": "2",
                             "context_window": 100_000, "max_output_tokens": 4_000})
    engine.catalog.register({"name": "other-model", "provider": "test", "mode": "chat",
                             "input_per_mtok": "1", "output_per_mtok": "2",
                             "context_window": 100_000, "max_output_tokens": 4_000})
    return engine


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(tmp_path: Path, clock: Clock) -> Iterator[Engine]:
    eng = make_engine(tmp_path / "budgets.db", clock)
    yield eng
    eng.close()


def window(engine: Engine, name: str, key: str = "") -> tuple[int, int]:
    """(spent, reserved) of the budget's current window, straight from the database."""
    [status] = [s for s in engine.budget_status(name) if s.scope_key == key]
    budget = {b.name: b for b in engine.budgets()}[name]
    return budget.amount_of(status.used), budget.amount_of(status.reserved)


def call(engine: Engine, cost_in: int = 1000, out: int = 500, **kwargs: object):
    """Admit a call of ``cost_in`` input tokens / ``out`` max output, settle at ``out``."""
    ticket = engine.admit(MODEL, input_tokens=cost_in, max_output_tokens=out, **kwargs)
    engine.settle(ticket, output_tokens=out)
    return ticket


# -- definitions -----------------------------------------------------------------------
def test_simplest_budget_is_global_daily_usd() -> None:
    budget = Budget(limit=1.00)
    assert (budget.scope, budget.period, budget.unit, budget.timezone) == \
        ("global", "day", "usd", "UTC")
    assert budget.limit_amount == 1_000_000_000
    assert budget.name == "global-day-usd"
    assert budget.level_amounts == (800_000_000, 950_000_000, 1_000_000_000)


@pytest.mark.parametrize("kwargs, field", [
    ({"limit": 0}, "limit"),
    ({"limit": -1.0}, "limit"),
    ({"limit": 1.0, "scope": "team-of-one"}, "scope"),
    ({"limit": 1.0, "period": "fortnight"}, "period"),
    ({"limit": 1.0, "unit": "eur"}, "unit"),
    ({"limit": 1.0, "timezone": "Mars/Olympus"}, "timezone"),
    ({"limit": 1.0, "levels": BudgetLevels(moderate=0.9, high=0.5)}, "levels"),
    ({"limit": 1.0, "scope": "global", "match": "x"}, "match"),
    ({"limit": 1.0, "downgrade_below": 2}, "downgrade_below"),
])
def test_bad_budget_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Budget(name="ops", **kwargs)
    assert "'ops'" in str(info.value) and f"'{field}" in str(info.value)


def test_absolute_levels_and_level_of() -> None:
    budget = Budget(limit=100_000, unit="tokens", period="run",
                    levels=BudgetLevels(moderate=10_000, high=50_000, absolute=True))
    assert budget.level_amounts == (10_000, 50_000, 100_000)
    assert [budget.level_of(n) for n in (9_999, 10_000, 50_000, 100_000)] == \
        ["normal", "moderate", "high", "critical"]


# -- enforcing -------------------------------------------------------------------------
def test_blocks_before_the_limit_and_names_everything(engine: Engine) -> None:
    engine.add_budget(Budget(name="daily", limit=0.01))  # $0.01 = 10M nanos
    admitted = 0
    with pytest.raises(ApprovalRequired) as info:
        for _ in range(100):
            call(engine, cost_in=1000, out=500)  # $0.002 a call, worst case = actual
            admitted += 1
    assert admitted == 5
    error = info.value
    assert isinstance(error, BudgetExceeded)
    for part in ("'daily'", "day window 2025-03-14", "spent $0.010000", "reserved $0.000000",
                 "limit $0.010000", "level critical"):
        assert part in str(error), part
    assert (error.budget, error.spent, error.reserved, error.limit, error.level) == \
        ("daily", 0.01, 0.0, 0.01, "critical")
    assert window(engine, "daily") == (10_000_000, 0)
    assert len(engine.usage(status="blocked")) == 1


def test_without_approval_a_stop_is_budget_exceeded(engine: Engine) -> None:
    engine.add_budget(Budget(name="hard", limit=0.001, require_approval=False))
    with pytest.raises(BudgetExceeded) as info:
        engine.admit(MODEL, input_tokens=2000, max_output_tokens=0)
    assert type(info.value) is BudgetExceeded


def test_reservation_is_the_worst_case_and_settle_replaces_it(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=1.0))
    ticket = engine.admit(MODEL, input_tokens=1000, max_output_tokens=1000)
    assert ticket.worst_case_nanos == 3_000_000
    assert window(engine, "d") == (0, 3_000_000)
    engine.settle(ticket, output_tokens=10)
    assert window(engine, "d") == (1_020_000, 0)
    engine.settle(ticket, output_tokens=999)  # idempotent
    assert window(engine, "d") == (1_020_000, 0)


def test_queued_settles_never_block_an_admit_that_fits(engine: Engine) -> None:
    """Settling runs on a background thread; an admit that finds no room settles the
    queue first, so the budget is never stricter than its settled spend."""
    engine.add_budget(Budget(name="warm-up", limit=1.0))
    asleep = threading.Event()
    idle = threading.Thread(target=asleep.wait, daemon=True)
    idle.start()
    engine._budgets._settler = idle  # the settler "is busy": settles stay queued
    engine.remove_budget("warm-up")
    for index in range(5):
        engine.add_budget(Budget(name=f"d{index}", limit=0.004, period="total",
                                 count_earlier_spend=False))
        first = engine.admit(MODEL, input_tokens=1000, max_output_tokens=1500)  # $0.004
        engine.settle(first, output_tokens=0)  # really $0.001
        second = engine.admit(MODEL, input_tokens=3000, max_output_tokens=0)  # the rest
        engine.release(second)
        assert len(engine._budgets._pending) == 1  # only the release is still queued
        engine.remove_budget(f"d{index}")
    asleep.set()


def test_close_settles_the_queue(tmp_path: Path, clock: Clock) -> None:
    first = make_engine(tmp_path / "q.db", clock)
    first.add_budget(Budget(name="d", limit=1.0))
    for _ in range(20):
        first.settle(first.admit(MODEL, input_tokens=1000, max_output_tokens=1000),
                     output_tokens=0)
    first.close()
    second = make_engine(tmp_path / "q.db", clock)
    second.add_budget(Budget(name="d", limit=1.0))
    assert window(second, "d") == (20_000_000, 0)
    second.close()


def test_default_max_output_is_the_models(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=1.0))
    ticket = engine.admit(MODEL, input_tokens=100)
    assert ticket.max_output_tokens == 4_000
    assert window(engine, "d")[1] == 100 * 1000 + 4_000 * 2000


def test_release_on_every_exit_path(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=1.0))

    class ProviderDown(Exception):
        pass

    def guarded(exc: BaseException) -> None:
        ticket = engine.admit(MODEL, input_tokens=1000, max_output_tokens=1000)
        try:
            raise exc
        except BaseException as error:
            engine.release(ticket, error=error)
            raise

    for exc in (ProviderDown("503"), KeyboardInterrupt(), TimeoutError()):
        with pytest.raises(type(exc)):
            guarded(exc)
        assert window(engine, "d") == (0, 0)
    assert {row.error_type for row in engine.usage(status="error")} == \
        {"ProviderDown", "KeyboardInterrupt", "TimeoutError"}


def test_error_with_billed_tokens_counts_them(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=1.0))
    ticket = engine.admit(MODEL, input_tokens=1000, max_output_tokens=1000)
    engine.release(ticket, error="timeout", input_tokens=1000)
    assert window(engine, "d") == (1_000_000, 0)


async def test_asyncio_cancellation_releases(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=1.0))
    entered, go_on, reserved = threading.Event(), threading.Event(), threading.Event()
    original = engine._budgets.reserve

    def slow_reserve(ticket):  # the admit thread is mid-reserve when the task is cancelled
        entered.set()
        go_on.wait(5)
        try:
            return original(ticket)
        finally:
            reserved.set()

    engine._budgets.reserve = slow_reserve
    task = asyncio.create_task(engine.aadmit(MODEL, input_tokens=1000, max_output_tokens=1000))
    await asyncio.to_thread(entered.wait, 5)
    task.cancel()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The task ends at once; the admit thread goes on reserving. Wait for that first: on a
    # loaded machine the window could read (0, 0) before the reservation was written.
    assert await asyncio.to_thread(reserved.wait, 5)
    for _ in range(200):  # the give-back runs when the admit thread returns
        await asyncio.sleep(0.01)
        if window(engine, "d") == (0, 0):
            break
    assert window(engine, "d") == (0, 0)

    ticket = await engine.aadmit(MODEL, input_tokens=1000, max_output_tokens=1000)
    await engine.asettle(ticket, output_tokens=0)
    assert window(engine, "d") == (1_000_000, 0)


def test_record_without_admit_still_counts(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=1.0))
    engine.record(MODEL, input_tokens=5000, operation_type="embedding")
    assert window(engine, "d") == (5_000_000, 0)


def test_token_budget_counts_input_and_output(engine: Engine) -> None:
    engine.add_budget(Budget(name="t", limit=10_000, unit="tokens"))
    ticket = engine.admit(MODEL, input_tokens=1000, max_output_tokens=2000)
    assert window(engine, "t") == (0, 3000)
    engine.settle(ticket, output_tokens=500)
    assert window(engine, "t") == (1500, 0)
    with pytest.raises(ApprovalRequired):
        engine.admit(MODEL, input_tokens=5000, max_output_tokens=4000)


# -- levels and decisions --------------------------------------------------------------
def test_levels_warn_review_and_downgrade(any_engine: Engine) -> None:
    engine = any_engine
    engine.add_budget(Budget(name="t", limit=10_000, unit="tokens", downgrade_below=0.1,
                             levels=BudgetLevels(moderate=0.5, high=0.8)))
    first = call(engine, cost_in=4000, out=0)
    assert (first.decision, first.warnings) == ("allow", [])
    second = call(engine, cost_in=2000, out=0)  # 6,000: moderate
    assert second.decision == "warn" and "moderate" in second.warnings[0]
    third = call(engine, cost_in=2500, out=0)  # 8,500: high -> flagged for review
    assert third.decision == "review" and "budget_review" in third.metadata
    [row] = [row for row in engine.usage() if row.id == third.id]
    assert row.metadata_ == {"budget_review": ["t"]}  # the flag is stored with the call
    fourth = call(engine, cost_in=1000, out=0)  # 9,500: 5 % left < 10 %
    assert fourth.decision == "downgrade"


def test_budget_headroom(engine: Engine) -> None:
    assert engine.budget_headroom(model=MODEL) is None
    engine.add_budget(Budget(name="d", limit=0.01))
    engine.add_budget(Budget(name="alice", limit=0.004, scope="user", match="alice"))
    assert engine.budget_headroom(model=MODEL, user_id="alice") == 1.0
    call(engine, cost_in=1000, out=500, user_id="alice")  # $0.002
    assert engine.budget_headroom(model=MODEL) == pytest.approx(0.8)
    assert engine.budget_headroom(model=MODEL, user_id="alice") == pytest.approx(0.5)


# -- scopes ----------------------------------------------------------------------------
def test_each_user_has_its_own_window(engine: Engine) -> None:
    engine.add_budget(Budget(name="per-user", limit=0.004, scope="user"))
    call(engine, user_id="alice")
    call(engine, user_id="alice")
    with pytest.raises(ApprovalRequired) as info:
        call(engine, user_id="alice")
    assert "user alice" in str(info.value)
    call(engine, user_id="bob")  # bob's window is untouched
    call(engine)  # no user: a user budget does not count it
    assert window(engine, "per-user", "alice") == (4_000_000, 0)
    assert window(engine, "per-user", "bob") == (2_000_000, 0)


@pytest.mark.parametrize("budget, inside, outside", [
    (Budget(name="p", limit=0.001, scope="project", match="search"),
     {"project": "search"}, {"project": "chat"}),
    (Budget(name="m", limit=0.001, scope="model", match="unit-*"),
     {}, {"model": "other-model"}),
    (Budget(name="t", limit=0.001, scope="tag", match="experiment"),
     {"tags": ["a", "experiment"]}, {"tags": ["a"]}),
    (Budget(name="o", limit=0.001, scope="operation", match="embedding"),
     {"operation_type": "embedding"}, {"operation_type": "chat_completion"}),
    (Budget(name="r", limit=0.001, scope="run", match="run-1"),
     {"run_id": "run-1"}, {"run_id": "run-2"}),
    (Budget(name="pr", limit=0.001, provider="test", scope="model", exclude=("other-model",)),
     {}, {"model": "other-model"}),
])
def test_scoped_budget_applies_only_to_matching_calls(engine: Engine, budget: Budget,
                                                      inside: dict, outside: dict) -> None:
    engine.add_budget(budget)
    model = outside.pop("model", MODEL)
    for _ in range(3):  # never blocked: the budget does not apply
        ticket = engine.admit(model, input_tokens=1000, max_output_tokens=0, **outside)
        engine.settle(ticket)
    engine.settle(engine.admit(MODEL, input_tokens=1000, max_output_tokens=0, **inside))
    with pytest.raises(ApprovalRequired):
        engine.admit(MODEL, input_tokens=1000, max_output_tokens=0, **inside)


def test_per_run_period_keys_each_run(engine: Engine) -> None:
    engine.add_budget(Budget(name="per-run", limit=3000, unit="tokens", period="run"))
    call(engine, cost_in=2000, out=0, run_id="r1")
    with pytest.raises(ApprovalRequired) as info:
        call(engine, cost_in=2000, out=0, run_id="c1", parent_run_id="r1", root_run_id="r1")
    assert "run:r1" in str(info.value)
    call(engine, cost_in=2000, out=0, run_id="r2")


def test_a_call_outside_any_run_is_a_run_of_its_own(engine: Engine) -> None:
    engine.add_budget(Budget(name="per-run", limit=3000, unit="tokens", period="run"))
    for _ in range(3):  # each lone call is checked alone, in memory: no stored window
        call(engine, cost_in=2000, out=500)
    with pytest.raises(BudgetExceeded) as info:  # no approval can lift a lone call's run
        engine.admit(MODEL, input_tokens=2000, max_output_tokens=1500)
    assert type(info.value) is BudgetExceeded and "'per-run'" in str(info.value)
    assert engine.budget_status("per-run") == []
    streaming = engine.admit(MODEL, input_tokens=2000, max_output_tokens=500)
    engine.check_stream(streaming, 900)  # past its reservation, within the run's limit
    with pytest.raises(BudgetExceeded, match="streaming"):
        engine.check_stream(streaming, 1001)
    engine.release(streaming)


def test_check_stream_stops_a_run_that_outgrows_its_reservation(any_engine: Engine) -> None:
    engine = any_engine
    engine.add_budget(Budget(name="per-run", limit=3000, unit="tokens", period="run"))
    engine.add_budget(Budget(name="daily", limit=1.0))  # does not stop streams
    ticket = engine.admit(MODEL, input_tokens=1000, max_output_tokens=1000, run_id="r")
    for produced in range(0, 1001, 50):
        engine.check_stream(ticket, produced)  # within the reservation: no DB trip needed
    engine.check_stream(ticket, 1500)  # grows the reservation while the window has room
    assert window(engine, "per-run", "run:r")[1] >= 2500
    with pytest.raises(BudgetExceeded) as info:
        engine.check_stream(ticket, 2500)  # 3,500 tokens > 3,000
    assert "streaming" in str(info.value)
    engine.settle(ticket, output_tokens=2000)
    assert window(engine, "per-run", "run:r") == (3000, 0)
    assert window(engine, "daily")[1] == 0


# -- approvals -------------------------------------------------------------------------
def test_approval_lifts_the_stop_for_this_window_only(any_engine: Engine, clock: Clock
                                                      ) -> None:
    engine = any_engine
    engine.add_budget(Budget(name="d", limit=0.002))
    call(engine)
    with pytest.raises(ApprovalRequired):
        call(engine)
    approval = engine.approve("d", extra=0.002, by="ops@example.com", reason="launch day")
    assert approval.extra == 0.002 and approval.active
    call(engine)
    with pytest.raises(ApprovalRequired):
        call(engine)  # the extra amount is used up
    engine.approve("d", expires=dt.timedelta(hours=1))  # no cap for an hour
    for _ in range(5):
        call(engine)
    clock.advance(hours=1, seconds=1)
    with pytest.raises(ApprovalRequired):
        call(engine)
    listed = engine.approvals("d")
    assert [a.approved_by for a in listed] == ["ops@example.com", None]
    assert [a.active for a in listed] == [True, False]
    clock.advance(days=1)  # a new window: approvals of yesterday do not carry over
    assert engine.approvals("d", active=True) == []
    call(engine)
    with pytest.raises(ApprovalRequired):
        call(engine)


def test_non_durable_commits_still_enforce(any_engine: Engine) -> None:
    engine = any_engine
    engine.configure_budgets(durable=False)
    engine.add_budget(Budget(name="d", limit=0.004))
    call(engine)
    call(engine)
    with pytest.raises(ApprovalRequired):
        call(engine)
    engine.configure_budgets(durable=True)
    assert window(engine, "d") == (4_000_000, 0)


def test_approve_needs_a_known_budget_and_key(engine: Engine) -> None:
    engine.add_budget(Budget(name="per-user", limit=0.002, scope="user"))
    with pytest.raises(ConfigurationError, match="unknown budget 'nope'"):
        engine.approve("nope")
    with pytest.raises(ConfigurationError, match="'key'"):
        engine.approve("per-user")
    with pytest.raises(ConfigurationError, match="'extra'"):
        engine.approve("per-user", key="alice", extra=-1)
    call(engine, user_id="alice")
    engine.approve("per-user", key="alice", extra=0.002)
    call(engine, user_id="alice")


def test_critical_below_the_limit_stops_early(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=0.01, levels=BudgetLevels(critical=0.4)))
    call(engine)
    call(engine)
    with pytest.raises(ApprovalRequired) as info:
        call(engine)
    assert "stops at $0.004000" in str(info.value)


# -- windows ---------------------------------------------------------------------------
D = dt.datetime


@pytest.mark.parametrize("period, now, start, end", [
    # New York: UTC-5 in winter, UTC-4 from 2025-03-09 (a 23-hour day).
    ("day", D(2025, 3, 9, 4, 59), D(2025, 3, 8, 5), D(2025, 3, 9, 5)),
    ("day", D(2025, 3, 9, 5, 0), D(2025, 3, 9, 5), D(2025, 3, 10, 4)),
    ("week", D(2025, 3, 10, 3, 59), D(2025, 3, 3, 5), D(2025, 3, 10, 4)),
    ("week", D(2025, 3, 10, 4, 0), D(2025, 3, 10, 4), D(2025, 3, 17, 4)),
    ("month", D(2025, 3, 1, 4, 59), D(2025, 2, 1, 5), D(2025, 3, 1, 5)),
    ("month", D(2025, 12, 31, 23), D(2025, 12, 1, 5), D(2026, 1, 1, 5)),
    ("hour", D(2025, 3, 9, 7, 30), D(2025, 3, 9, 7), D(2025, 3, 9, 8)),
    ("total", D(2025, 3, 9, 7, 30), D(1970, 1, 1), None),
])
def test_window_bounds_in_new_york(period: str, now: dt.datetime, start: dt.datetime,
                                   end: dt.datetime | None) -> None:
    assert window_bounds(period, now, "America/New_York") == (start, end)


def test_india_half_hour_offset_hour_windows() -> None:
    start, end = window_bounds("hour", dt.datetime(2025, 1, 1, 10, 10), "Asia/Kolkata")
    assert (start, end) == (dt.datetime(2025, 1, 1, 9, 30), dt.datetime(2025, 1, 1, 10, 30))


@pytest.mark.parametrize("period, before, after", [
    ("day", dt.datetime(2025, 3, 9, 4, 59), dt.datetime(2025, 3, 9, 5, 0)),
    ("week", dt.datetime(2025, 3, 10, 3, 59), dt.datetime(2025, 3, 10, 4, 0)),
    ("month", dt.datetime(2025, 4, 1, 3, 59), dt.datetime(2025, 4, 1, 4, 0)),
])
def test_roll_over_gives_a_fresh_window(tmp_path: Path, period: str, before: dt.datetime,
                                        after: dt.datetime) -> None:
    clock = Clock(before)
    engine = make_engine(tmp_path / "roll.db", clock)
    engine.add_budget(Budget(name="b", limit=0.002, period=period,  # type: ignore[arg-type]
                             timezone="America/New_York"))
    call(engine)
    with pytest.raises(ApprovalRequired):
        call(engine)
    clock.now = after  # local midnight: no reset job, the first call opens the window
    call(engine)
    [status] = engine.budget_status("b")
    assert (status.window_start, status.used) == (after, 0.002)
    engine.close()


# -- LiteLLM regressions -------------------------------------------------------------
def test_litellm_40095_34732_concurrent_first_requests_of_a_new_user(any_engine: Engine
                                                                     ) -> None:
    """Many first requests of a brand-new user at once: exactly the budget gets through."""
    engine = any_engine
    engine.add_budget(Budget(name="per-user", limit=0.004, scope="user"))
    admitted, blocked = [], []
    barrier = threading.Barrier(12)

    def first_request() -> None:
        barrier.wait()
        try:
            admitted.append(engine.admit(MODEL, input_tokens=1000, max_output_tokens=500,
                                         user_id="new-user"))
        except ApprovalRequired:
            blocked.append(1)

    threads = [threading.Thread(target=first_request) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(admitted), len(blocked)) == (2, 10)
    with engine.store.engine.connect() as conn:
        rows = conn.exec_driver_sql("select count(*) from budgetkit_budget_window "
                                    "where budget = 'per-user'").scalar()
    assert rows == 1


def test_litellm_27639_dead_reservations_expire(tmp_path: Path) -> None:
    """A process killed between reserve and settle does not hold the budget forever."""
    clock = Clock()
    first = make_engine(tmp_path / "shared.db", clock)
    first.add_budget(Budget(name="d", limit=0.01))
    for _ in range(3):
        first.admit(MODEL, input_tokens=1000, max_output_tokens=1000)  # never settled
    first._writer.close()  # the process "dies": no settle, no release
    second = make_engine(tmp_path / "shared.db", clock)
    second.add_budget(Budget(name="d", limit=0.01))
    second.configure_budgets(reservation_timeout=300)
    assert window(second, "d") == (0, 9_000_000)
    with pytest.raises(ApprovalRequired):  # reads as nearly exceeded at zero real spend
        second.admit(MODEL, input_tokens=1000, max_output_tokens=1000)
    clock.advance(seconds=901)  # past the default timeout the first engine used
    ticket = second.admit(MODEL, input_tokens=1000, max_output_tokens=1000)
    assert window(second, "d") == (0, 3_000_000)
    second.settle(ticket, output_tokens=0)
    assert window(second, "d") == (1_000_000, 0)
    assert second.reclaim_reservations() == 0
    second.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_engine(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
               ) -> Iterator[Engine]:
    """The same engine on a SQLite file and on PostgreSQL (skipped without a server)."""
    db = (tmp_path / "any.db" if request.param == "sqlite"
          else request.getfixturevalue("pg_url"))
    eng = make_engine(db, clock)  # type: ignore[arg-type]
    yield eng
    eng.close()


def test_late_settle_after_reclaim_counts_once(any_engine: Engine, clock: Clock) -> None:
    engine = any_engine
    engine.add_budget(Budget(name="d", limit=1.0))
    ticket = engine.admit(MODEL, input_tokens=1000, max_output_tokens=1000)
    clock.advance(seconds=901)
    assert engine.reclaim_reservations() == 3_000_000
    engine.settle(ticket, output_tokens=100)
    assert window(engine, "d") == (1_200_000, 0)


def test_litellm_34492_period_added_later_counts_only_the_current_window(
        tmp_path: Path) -> None:
    clock = Clock(dt.datetime(2025, 3, 10, 12))
    engine = make_engine(tmp_path / "team.db", clock)
    engine.add_budget(Budget(name="team", limit=0.01, period="total", scope="project",
                             match="team-a"))
    for _ in range(4):
        call(engine, project="team-a")  # $0.008 spent in total, on earlier days
    clock.advance(days=3)
    engine.add_budget(Budget(name="team", limit=0.004, period="day", scope="project",
                             match="team-a"), replace=True)
    call(engine, project="team-a")  # only today's spend counts against the daily limit
    call(engine, project="team-a")
    with pytest.raises(ApprovalRequired):
        call(engine, project="team-a")
    [status] = engine.budget_status("team")
    assert (status.period, status.used) == ("day", 0.004)
    engine.close()


def test_a_new_budget_counts_this_windows_earlier_spend_only(tmp_path: Path) -> None:
    clock = Clock(dt.datetime(2025, 3, 10, 12))
    engine = make_engine(tmp_path / "late.db", clock)
    for _ in range(3):  # yesterday, before any budget existed
        engine.record(MODEL, input_tokens=1000, user_id="alice", tags=["rag"])
    clock.advance(days=1)
    engine.record(MODEL, input_tokens=2000, user_id="alice", tags=["rag"])
    engine.record(MODEL, input_tokens=4000, user_id="bob")
    engine.record(MODEL, input_tokens=8000, user_id="alice", status="cached")
    engine.flush()
    engine.add_budget(Budget(name="all", limit=1.0))
    engine.add_budget(Budget(name="users", limit=1.0, scope="user"))
    engine.add_budget(Budget(name="rag", limit=10_000, unit="tokens", scope="tag", match="r*"))
    engine.add_budget(Budget(name="fresh", limit=1.0, count_earlier_spend=False))
    assert window(engine, "all") == (6_000_000, 0)
    assert window(engine, "fresh") == (0, 0)
    call(engine, cost_in=1000, out=0, user_id="alice", tags=["rag"])
    assert window(engine, "users", "alice") == (3_000_000, 0)
    assert window(engine, "all") == (7_000_000, 0)
    [rag] = engine.budget_status("rag")
    assert rag.used == 3000  # 2,000 earlier today + 1,000 now
    engine.close()


def test_windows_deleted_behind_the_engines_back_are_recreated(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=0.01))
    call(engine)
    engine.flush()
    with sqlite3.connect(engine.store.url.removeprefix("sqlite:///")) as conn:
        conn.execute("delete from budgetkit_budget_window")  # an operator's "reset"
    call(engine)  # the cached window id is stale: recreated, not a false block
    assert window(engine, "d") == (4_000_000, 0)  # back-filled from the ledger


def test_add_budget_rejects_a_different_budget_under_the_same_name(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=1.0))
    engine.add_budget(Budget(name="d", limit=1.0))  # same: fine
    with pytest.raises(ConfigurationError, match="'d'"):
        engine.add_budget(Budget(name="d", limit=2.0))


# -- status ----------------------------------------------------------------------------
def test_budget_status_reports_used_reserved_remaining(engine: Engine) -> None:
    engine.add_budget(Budget(name="d", limit=0.01))
    assert [(s.used, s.reserved, s.remaining, s.percentage) for s in engine.budget_status()] \
        == [(0.0, 0.0, 0.01, 0.0)]
    call(engine)
    held = engine.admit(MODEL, input_tokens=1000, max_output_tokens=500)
    [status] = engine.budget_status()
    assert (status.used, status.reserved, status.remaining, status.percentage, status.level) \
        == (0.002, 0.002, 0.006, 20.0, "normal")
    engine.release(held)


# -- files -----------------------------------------------------------------------------
TOML = """
presets = ["token-ladders"]

[[budget]]
name = "daily"
limit = 5.0
timezone = "Europe/Berlin"

[[budget]]
name = "per-user"
scope = "user"
period = "month"
limit = 1.5
alert_at = [0.5, 0.9]
levels = { moderate = 0.6, high = 0.9 }
"""


def test_load_budgets_from_toml_and_json(tmp_path: Path, engine: Engine) -> None:
    path = tmp_path / "budgets.toml"
    path.write_text(TOML)
    loaded = engine.load_budgets(path)
    assert [b.name for b in loaded] == ["tokens-per-run", "tokens-daily", "tokens-monthly",
                                        "daily", "per-user"]
    per_user = loaded[-1]
    assert (per_user.scope, per_user.period, per_user.alert_at) == ("user", "month", (0.5, 0.9))
    as_json = tmp_path / "budgets.json"
    as_json.write_text(json.dumps({"budgets": [{"name": "j", "limit": 2, "unit": "tokens"}]}))
    assert load_budgets(as_json)[0].limit_amount == 2


@pytest.mark.parametrize("entry, budget, field", [
    ('name = "daily"\nlimit = "five"', "daily", "limit"),
    ('name = "daily"\nlimit = 5\nperiod = "daily"', "daily", "period"),
    ('name = "daily"\nlimt = 5', "daily", "limt"),
    ('name = "daily"', "daily", "limit"),
    ('name = "daily"\nlimit = 5\nlevels = { moderat = 0.5 }', "daily", "levels.moderat"),
    ('limit = 5\nscope = "galaxy"', "#2", "scope"),
])
def test_a_file_with_a_mistake_names_budget_and_field(tmp_path: Path, engine: Engine,
                                                      entry: str, budget: str,
                                                      field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[budget]]\nname = "fine"\nlimit = 1\n\n[[budget]]\n' + entry + "\n")
    with pytest.raises(ConfigurationError) as info:
        engine.load_budgets(path)
    message = str(info.value)
    assert str(path) in message and f"budget '{budget}'" in message \
        and f"field '{field}" in message, message
    assert engine.budgets() == []  # nothing registered


def test_not_toml_at_all(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[budget]\nlimit = ")
    with pytest.raises(ConfigurationError, match="bad.toml"):
        load_budgets(path)


# -- presets ---------------------------------------------------------------------------
def test_token_ladders_follow_the_seed() -> None:
    ladders = {b.period: b for b in token_ladder_budgets()}
    assert {p: b.level_amounts for p, b in ladders.items()} == {
        "run": (10_000, 50_000, 100_000),
        "day": (50_000, 200_000, 500_000),
        "month": (1_500_000, 6_000_000, 15_000_000),
    }
    assert all(b.unit == "tokens" and b.require_approval for b in ladders.values())


def test_model_budgets_follow_the_seed(engine: Engine) -> None:
    budgets = {b.name: b for b in model_token_budgets()}
    assert budgets["model-gpt-4o-run"].limit_amount == 20_000
    assert budgets["model-gpt-4o-mini-day"].limit_amount == 150_000
    assert budgets["model-llama-3.3-70b-versatile-month"].limit_amount == 6_000_000
    assert budgets["model-gpt-3.5-turbo-month"].limit_amount == 6_000_000
    other = budgets["model-groq-other-run"]
    assert other.limit_amount == 30_000 and other.provider == "groq"
    assert len(seed_budgets()) == 3 + len(budgets)
    for budget in budgets.values():
        engine.add_budget(budget)
    # gpt-4o may not take 25k tokens in one run; gpt-4o-mini may (its run budget is 30k).
    with pytest.raises(BudgetExceeded, match="model-gpt-4o-run"):
        engine.admit("gpt-4o", input_tokens=20_000, max_output_tokens=5_000)
    engine.release(engine.admit("gpt-4o-mini", input_tokens=20_000, max_output_tokens=5_000))
    # another Groq model falls under "other Groq models", each on its own
    with pytest.raises(BudgetExceeded, match="model-groq-other-run"):
        engine.admit("gemma2-9b-it", input_tokens=25_000, max_output_tokens=6_000)
    # within a run, the per-run budget adds up the run's calls and can be approved
    engine.settle(engine.admit("gpt-4o", input_tokens=15_000, max_output_tokens=0, run_id="r"))
    with pytest.raises(ApprovalRequired, match="model-gpt-4o-run.*run_id='r'"):
        engine.admit("gpt-4o", input_tokens=6_000, max_output_tokens=0, run_id="r")
