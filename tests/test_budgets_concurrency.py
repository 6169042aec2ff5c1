"""Budgets hold under concurrency: threads, asyncio tasks, and processes sharing a database.

The multi-process test is LiteLLM #23714 ("N processes each allow the whole budget"):
4 processes × 8 threads make calls of random cost against one $1.00 budget, on a SQLite
file and on PostgreSQL. Settled spend must never exceed the limit, and the budget must not
be left with more than one call's worst case unused (not too timid).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from budgetkit import Budget, BudgetExceeded, Engine

MODEL = "gpt-4o"  # $2.50 / $10.00 per million tokens
# Random calls: 1,000-5,000 prompt tokens, up to 200-1,500 output tokens (worst case).
MAX_WORST_NANOS = 5_000 * 2_500 + 1_500 * 10_000  # $0.0275


def random_call(engine: Engine, rng: random.Random, lanes: dict[str, Any] | None = None,
                **attribution: object) -> int | None:
    """One call: admit its worst case, 'run' it, settle a random actual. Returns the cost,
    or None when blocked with nothing in flight (the budget is really used up).

    With ``lanes`` (shared by a process's threads, as by a LangChain handler), the call is
    admitted in the admission lane of the last full admit when it can be, and its ticket
    built after the call."""
    while True:
        input_tokens, max_output = rng.randint(1_000, 5_000), rng.randint(200, 1_500)
        lane = lanes.get("lane") if lanes is not None else None
        held = lane.admit(input_tokens, max_output) if lane is not None else None
        if held is None:
            try:
                ticket = engine.admit(MODEL, input_tokens=input_tokens,
                                      max_output_tokens=max_output, **attribution)
            except BudgetExceeded as blocked:
                if blocked.reserved == 0:
                    return None
                time.sleep(0.0005)  # others' calls are in flight; their actuals may leave room
                continue
            if lanes is not None:
                lanes["lane"] = engine.lane(ticket)
        time.sleep(rng.random() * 0.003)  # the provider call
        if held is not None:
            ticket = held.attach(engine.ticket(MODEL, input_tokens=input_tokens,
                                               max_output_tokens=max_output, **attribution))
            lanes["admitted"] = lanes.get("admitted", 0) + 1  # type: ignore[index]
        record = engine.settle(ticket, output_tokens=rng.randint(0, ticket.max_output_tokens))
        assert record is not None
        return record.cost_nanos


WORKER = r"""
import json, random, sys, threading, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_budgets_concurrency import random_call
from budgetkit import Budget, Engine

db, name, seed, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
lanes = {{}} if sys.argv[5] == "lanes" else None
limit = float(sys.argv[6])
engine = Engine(db=db)
engine.add_budget(Budget(name=name, limit=limit, period="total"))
# a second, roomy budget per process: every admit reserves two windows in one statement
engine.add_budget(Budget(name=name + "-user", limit=100.0, scope="user", period="total"))
totals, calls = [], []
errors = []
def worker(i):
    rng = random.Random(seed * 100 + i)
    spent = n = 0
    try:
        while (cost := random_call(engine, rng, lanes, user_id=f"p{{seed}}")) is not None:
            spent += cost
            n += 1
    except BaseException as exc:
        errors.append(exc)
        raise
    totals.append(spent)
    calls.append(n)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
go.with_name(f"ready-{{seed}}").touch()
while not go.exists():
    time.sleep(0.01)
for t in threads: t.start()
for t in threads: t.join()
engine.close()
if errors:
    sys.exit(f"worker failed: {{errors[0]!r}}")
print(json.dumps({{"spent": sum(totals), "calls": sum(calls),
                  "in_lane": (lanes or {{}}).get("admitted", 0)}}))
"""


def window_totals(engine: Engine, name: str) -> tuple[int, int]:
    [status] = [s for s in engine.budget_status(name) if s.budget == name]
    return round(status.used * 1e9), round(status.reserved * 1e9)


def run_processes(db: str, tmp_path: Path, mode: str = "admit", limit: float = 1.00) -> None:
    name = f"shared-{uuid.uuid4().hex[:8]}"
    go = tmp_path / "go"
    script = WORKER.format(tests=str(Path(__file__).parent))
    parent = Engine(db=db)  # creates the tables once, before the workers race
    parent.add_budget(Budget(name=name, limit=limit, period="total"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, db, name, str(seed), str(go),
                               mode, str(limit)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for seed in range(4)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{seed}").exists() for seed in range(4)):
        assert time.monotonic() < deadline, "workers did not start"
        assert all(proc.poll() is None for proc in procs), procs[0].stderr.read()
        time.sleep(0.02)
    go.touch()  # all four race from here
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    settled = sum(result["spent"] for result in results)
    spent, reserved = window_totals(parent, name)
    ledger = sum(row.cost_nanos for row in parent.usage() if row.status == "ok")
    parent.close()
    # processes really raced (on a loaded machine one may start late and find nothing left)
    assert sum(result["calls"] > 0 for result in results) >= 2
    assert reserved == 0
    assert settled == spent == ledger  # the window, the workers and the ledger agree
    limit_nanos = round(limit * 1e9)
    assert settled <= limit_nanos, "the budget was exceeded"
    assert limit_nanos - settled < MAX_WORST_NANOS, "left more than one call unused"
    if mode == "lanes":
        assert sum(result["in_lane"] for result in results) > 0


@pytest.mark.slow
def test_litellm_23714_four_processes_x_eight_threads_on_a_sqlite_file(tmp_path: Path) -> None:
    run_processes(str(tmp_path / "shared.db"), tmp_path)


@pytest.mark.slow
def test_litellm_23714_four_processes_x_eight_threads_on_postgresql(pg_url: str,
                                                                  tmp_path: Path) -> None:
    run_processes(pg_url, tmp_path)


# With lanes, $5: room for leases (and so lanes) to be taken before the end comes near.
@pytest.mark.slow
def test_four_processes_admitting_in_lanes_on_a_sqlite_file(tmp_path: Path) -> None:
    run_processes(str(tmp_path / "lanes.db"), tmp_path, "lanes", limit=5.00)


@pytest.mark.slow
def test_four_processes_admitting_in_lanes_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    run_processes(pg_url, tmp_path, "lanes", limit=5.00)


def test_threads_in_one_process(tmp_path: Path) -> None:
    engine = Engine(db=str(tmp_path / "threads.db"))
    engine.add_budget(Budget(name="d", limit=0.25))
    spent: list[int] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while (cost := random_call(engine, rng)) is not None:
            spent.append(cost)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert window_totals(engine, "d") == (sum(spent), 0)
    assert 250_000_000 - MAX_WORST_NANOS < sum(spent) <= 250_000_000
    engine.close()


async def test_asyncio_tasks(tmp_path: Path) -> None:
    engine = Engine(db=str(tmp_path / "tasks.db"))
    engine.add_budget(Budget(name="d", limit=0.2))
    spent: list[int] = []

    async def task(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            try:
                ticket = await engine.aadmit(MODEL, input_tokens=rng.randint(1_000, 5_000),
                                             max_output_tokens=rng.randint(200, 1_500))
            except BudgetExceeded as blocked:
                if blocked.reserved == 0:
                    return
                await asyncio.sleep(0)
                continue
            await asyncio.sleep(rng.random() * 0.001)
            record = await engine.asettle(
                ticket, output_tokens=rng.randint(0, ticket.max_output_tokens))
            spent.append(record.cost_nanos)

    await asyncio.gather(*(task(seed) for seed in range(20)))
    assert window_totals(engine, "d") == (sum(spent), 0)
    assert 200_000_000 - MAX_WORST_NANOS < sum(spent) <= 200_000_000
    engine.close()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_many_budgets_one_statement_all_or_nothing(tmp_path: Path, database: str,
                                                   request: pytest.FixtureRequest) -> None:
    """All windows are reserved in one statement; one without room reserves nothing."""
    db = (str(tmp_path / "many.db") if database == "sqlite"
          else request.getfixturevalue("pg_url"))
    engine = Engine(db=db)
    for index in range(5):
        engine.add_budget(Budget(name=f"roomy-{index}", limit=10.0))
    engine.add_budget(Budget(name="tight", limit=0.01, scope="user", match="alice"))
    ticket = engine.admit(MODEL, input_tokens=1_000, max_output_tokens=0, user_id="alice")
    assert len(ticket.reservations) == 6
    assert {s.reserved for s in engine.budget_status()} == {0.0025}
    engine.settle(ticket)
    with pytest.raises(BudgetExceeded, match="'tight'"):
        engine.admit(MODEL, input_tokens=4_000, max_output_tokens=0, user_id="alice")
    statuses = engine.budget_status()
    assert {(s.used, s.reserved) for s in statuses} == {(0.0025, 0.0)}
    engine.close()
