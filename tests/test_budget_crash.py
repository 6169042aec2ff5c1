"""Budgets under crash: four real processes hold reservations on one ledger; three are
killed with SIGKILL. Their held money comes back within the reservation timeout (the
survivor's hold, renewed by its heartbeat, stays), and the spend they had settled stays
counted. On a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from budgetkit import Budget, BudgetExceeded, Engine

MODEL = "gpt-4o"
TIMEOUT = 3.0  # reservation_timeout of every process here (the default is 60 s)
HOLD_OUTPUT = 4000  # the held call's max output tokens
SETTLED_CALLS = 5

_HOLDER = textwrap.dedent("""
    import sys, time
    from budgetkit import Budget, Engine

    db, index, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
    engine = Engine(db=db)
    engine.add_budget(Budget(name="crash", limit=limit))
    engine.configure_budgets(reservation_timeout=float(sys.argv[4]))
    for call in range(int(sys.argv[5])):
        ticket = engine.admit("gpt-4o", input_tokens=100, max_output_tokens=10,
                              request_id=f"p{index}-{call}")
        engine.settle(ticket, input_tokens=100, output_tokens=10)
    engine.flush()  # settled: in the window's spend
    held = engine.admit("gpt-4o", input_tokens=10, max_output_tokens=int(sys.argv[6]))
    print("holding", held.id, flush=True)
    time.sleep(600)  # a long call (it outlives the timeout many times)
""")


def _amounts() -> tuple[int, int]:
    with Engine(db=":memory:", journal=False) as engine:
        price = engine.catalog.get(MODEL)
        return price.cost_nanos(100, 10), price.cost_nanos(10, HOLD_OUTPUT)


def _reserved_rows(engine: Engine) -> dict[str, int]:
    with engine.store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT ticket_id, amount FROM budgetkit_budget_reservation").all()
    return {str(ticket): int(amount) for ticket, amount in rows}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_killed_holders_money_returns_and_settled_spend_stays(tmp_path: Path, request,
                                                              backend: str) -> None:
    url = (str(tmp_path / "crash.db") if backend == "sqlite"
           else request.getfixturevalue("pg_url"))
    settled_each, hold = _amounts()
    settled = 4 * SETTLED_CALLS * settled_each
    limit_nanos = settled + 4 * hold + hold // 2  # four holds leave no room for a fifth
    limit = limit_nanos / 1e9
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    Engine(db=url, journal=False).close()  # tables made once, before four processes race
    processes = [subprocess.Popen([sys.executable, str(script), url, str(index), str(limit),
                                   str(TIMEOUT), str(SETTLED_CALLS), str(HOLD_OUTPUT)],
                                  stdout=subprocess.PIPE, text=True)
                 for index in range(4)]
    try:
        tickets = []
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline().split()
            assert line[0] == "holding", line
            tickets.append(line[1])

        with Engine(db=url) as probe:
            probe.add_budget(Budget(name="crash", limit=limit))
            probe.configure_budgets(reservation_timeout=TIMEOUT)
            with pytest.raises(BudgetExceeded):  # four holds: no room for a fifth
                probe.admit(MODEL, input_tokens=10, max_output_tokens=HOLD_OUTPUT)

            time.sleep(2 * TIMEOUT)  # the holds outlive their timeout: the heartbeat renews
            assert set(_reserved_rows(probe)) == set(tickets)
            with pytest.raises(BudgetExceeded):
                probe.admit(MODEL, input_tokens=10, max_output_tokens=HOLD_OUTPUT)

            for process in processes[1:]:
                process.kill()  # SIGKILL: no release, no settle, no exit handler
                process.wait(timeout=30)
                assert process.returncode == -signal.SIGKILL
            killed_at = time.monotonic()
            admitted = None
            while admitted is None and time.monotonic() - killed_at < 4 * TIMEOUT + 10:
                try:
                    admitted = probe.admit(MODEL, input_tokens=10,
                                           max_output_tokens=HOLD_OUTPUT)
                except BudgetExceeded:
                    time.sleep(0.2)
            waited = time.monotonic() - killed_at
            assert admitted is not None, "the killed processes' holds never came back"
            # expiry is at most TIMEOUT after the last renewal (itself < TIMEOUT/3 old)
            assert waited <= TIMEOUT + 5
            probe.release(admitted)
            probe.flush()
            while set(_reserved_rows(probe)) != {tickets[0]} \
                    and time.monotonic() - killed_at < TIMEOUT + 5:
                probe.reclaim_reservations()  # the periodic sweep, without waiting for it
                time.sleep(0.2)
            assert set(_reserved_rows(probe)) == {tickets[0]}  # the survivor still holds
            (status,) = probe.budget_status("crash")
        assert round(status.used * 1e9) == settled  # every process's settled spend stays
        assert round(status.reserved * 1e9) == hold
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()
