"""The background threads sleep when there is nothing to do, and no work is left behind by
their sleeping: a row or deferred job that arrives while they sleep is still handled
without anyone flushing (no lost wake-up)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from budgetkit import Budget, Engine
from budgetkit.ledger import BatchWriter, DeferredJobs


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` (a synchronisation wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_an_idle_writer_does_not_wake_and_a_late_row_is_still_written() -> None:
    written: list[str] = []
    writer = BatchWriter(lambda rows: written.extend(row["id"] for row in rows),
                         flush_interval=0.05)
    looks = 0
    original = writer._next

    def counted() -> tuple[str, float | None]:
        nonlocal looks
        looks += 1
        return original()

    writer._next = counted  # type: ignore[method-assign]
    try:
        writer.wake()  # let it take one look with the counter in place
        assert wait_for(lambda: looks >= 1 and writer._asleep)
        before = looks
        time.sleep(0.5)  # idle: ten of the old 50 ms timer's wake-ups
        assert looks == before
        for round_index in range(20):  # rows arriving just as it falls asleep, each time
            writer.submit({"id": f"row-{round_index}"})
            assert wait_for(lambda: len(written) == round_index + 1), round_index
            assert wait_for(lambda: writer._asleep)
    finally:
        writer.close()
    assert written == [f"row-{index}" for index in range(20)]


def test_deferred_work_runs_without_a_flush(tmp_path: Path) -> None:
    with Engine(db=str(tmp_path / "deferred.db")) as engine:
        assert wait_for(lambda: engine._writer._asleep)
        for index in range(10):
            ran = threading.Event()
            engine.defer(ran.set)
            assert ran.wait(5), index  # run by the writer, woken for it
            assert wait_for(lambda: engine._writer._asleep)


def test_the_settler_sleeps_when_idle_and_renews_a_new_hold(tmp_path: Path) -> None:
    with Engine(db=str(tmp_path / "settler.db")) as engine:
        engine.add_budget(Budget(name="day", limit=10.0))
        engine.configure_budgets(reservation_timeout=1.5)
        engine.settle(engine.admit("gpt-4o-mini", input_tokens=10), output_tokens=1)
        engine.flush()
        book = engine._budgets
        assert book is not None
        assert wait_for(lambda: book._asleep)  # nothing queued, held or leased
        ticket = engine.admit("gpt-4o-mini", input_tokens=10, max_output_tokens=10)
        assert wait_for(lambda: not book._asleep)  # woken: a hold to renew
        with engine.store.engine.connect() as conn:
            first = conn.exec_driver_sql(
                "SELECT expires_at FROM budgetkit_budget_reservation").scalar()
        assert wait_for(lambda: _expiry(engine) != first, timeout=5)  # renewed by the beat
        engine.settle(ticket, output_tokens=1)
        assert wait_for(lambda: book._asleep)


def _expiry(engine: Engine) -> object:
    with engine.store.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT expires_at FROM budgetkit_budget_reservation").scalar()


def test_new_deferred_work_shortens_a_sleep_toward_a_later_batch() -> None:
    # Rows wait up to flush_interval for their batch (with the journal: a second); deferred
    # work is due prepare_delay after it arrives. A writer asleep until the batch must wake
    # and sleep only until the work is due: otherwise the work waited for the batch and
    # the callers ran it on their own threads (found on the real HTTP path: 245 of 300
    # calls' bookkeeping ran on the caller's thread). Margins of 5 s against 30 s.
    written: list[str] = []
    jobs = DeferredJobs(max_waiting=1000, wake_at=1000)
    jobs.MAX_AGE = 60.0  # (no caller runs the queue here: only the writer can)
    writer = BatchWriter(lambda rows: written.extend(row["id"] for row in rows),
                         flush_interval=30.0, prepare=jobs.run, prepare_due=jobs.due,
                         prepare_delay=5.0)
    jobs.writer = writer
    try:
        writer.submit({"id": "row"})
        assert wait_for(lambda: writer._sleep_until > time.monotonic() + 20)  # the batch
        ran: list[str] = []
        jobs.add(lambda: ran.append(threading.current_thread().name))
        assert wait_for(lambda: writer._sleep_until < time.monotonic() + 10)
        assert ran == []  # not yet due
    finally:
        writer.close()
    assert written == ["row"] and ran  # close ran the work and wrote the row
