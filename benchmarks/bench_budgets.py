"""What budgets cost per call, and how many calls per second one shared budget admits.

    python benchmarks/bench_budgets.py [--calls 2000] [--pg postgresql://...]

1. admit + settle per call with 0 (ledger only), 1, 3 and 10 applicable budgets, on a
   SQLite file and (with ``--pg`` or ``BUDGETKIT_TEST_POSTGRES_URL``) on PostgreSQL.
   Ratios are to the ledger-only engine on the same database, measured in the same run.
2. The same in an admission lane (``engine.lane``, as the LangChain handler admits): the
   admit the caller waits for, and the ticket + attach + settle done after the call.
3. Sustained admitted calls per second from 4 processes (4 threads each) sharing one
   budget, on each database.

No peer is measured here: LiteLLM enforces budgets only in its proxy server (Prisma,
PostgreSQL, Redis), which cannot run in this offline benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from budgetkit import Budget, Engine  # noqa: E402
from _stages import Stages  # noqa: E402  (benchmarks/_stages.py, next to this script)

MODEL = "gpt-4o-mini"


def add_budgets(engine: Engine, count: int) -> list[str]:
    """Register ``count`` budgets that every measured call counts in; returns their names.

    Budgets are stored in the ledger (every engine on it enforces them), so each
    measurement removes its own when done: otherwise the next measurement on the same
    database (and every later run on a PostgreSQL one) would also hold these.
    """
    tag = uuid.uuid4().hex[:6]
    names = []
    for index in range(count):
        scope = ("global", "user", "project", "model", "tag")[index % 5]
        match = {"global": None, "user": "u", "project": "p", "model": MODEL, "tag": "t"}[scope]
        budget = Budget(name=f"b{index}-{tag}", limit=1_000_000.0, scope=scope, match=match,
                        period=("day", "month", "total")[index % 3])
        engine.add_budget(budget)
        names.append(budget.name)
    return names


def close_removing(engine: Engine, names: list[str]) -> None:
    for name in names:
        engine.remove_budget(name)
    engine.close()


def per_call(db: str, budgets: int, calls: int, durable: bool = True) -> tuple[float, float]:
    """Median-of-3 microseconds per admit and per settle (as the caller waits for them;
    settling itself is batched on a background thread or, on SQLite, in the next admit)."""
    engine = Engine(db=db)
    if not durable:
        engine.configure_budgets(durable=False)
    names = add_budgets(engine, budgets)
    attribution = {"user_id": "u", "project": "p", "tags": ("t",)}
    for _ in range(50):  # warm up: windows created and cached, statements compiled
        engine.settle(engine.admit(MODEL, input_tokens=500, max_output_tokens=200,
                                   **attribution), output_tokens=100)
    admits, settles = [], []
    for _ in range(3):
        admit_total = settle_total = 0.0
        for _ in range(calls):
            start = time.perf_counter()
            ticket = engine.admit(MODEL, input_tokens=500, max_output_tokens=200, **attribution)
            middle = time.perf_counter()
            engine.settle(ticket, output_tokens=100)
            admit_total += middle - start
            settle_total += time.perf_counter() - middle
        admits.append(admit_total / calls * 1e6)
        settles.append(settle_total / calls * 1e6)
    close_removing(engine, names)
    return statistics.median(admits), statistics.median(settles)


def per_call_in_lane(db: str, budgets: int, calls: int) -> tuple[float, float, int]:
    """Median-of-3 microseconds per admit in an admission lane (what an adapter's caller
    waits for) and per ticket + attach + settle (what the adapter does after the call,
    off the caller's thread); and how many admits the lane declined (admitted in full)."""
    engine = Engine(db=db)
    names = add_budgets(engine, budgets)
    attribution = {"user_id": "u", "project": "p", "tags": ("t",)}
    for _ in range(50):  # warm up: windows found, leases taken
        ticket = engine.admit(MODEL, input_tokens=500, max_output_tokens=200, **attribution)
        engine.settle(ticket, output_tokens=100)
    lane = engine.lane(ticket)
    assert lane is not None
    admits, afters, declined = [], [], 0
    for _ in range(3):
        admit_total = after_total = 0.0
        for _ in range(calls):
            start = time.perf_counter()
            held = lane.admit(500, 200)
            middle = time.perf_counter()
            if held is None:  # the ordinary way (and a fresh lane for the next calls)
                declined += 1
                ticket = engine.admit(MODEL, input_tokens=500, max_output_tokens=200,
                                      **attribution)
                lane = engine.lane(ticket) or lane
            else:
                ticket = held.attach(engine.ticket(MODEL, input_tokens=500,
                                                   max_output_tokens=200, **attribution))
            engine.settle(ticket, output_tokens=100)
            admit_total += middle - start
            after_total += time.perf_counter() - middle
        admits.append(admit_total / calls * 1e6)
        afters.append(after_total / calls * 1e6)
    close_removing(engine, names)
    return statistics.median(admits), statistics.median(afters), declined


WORKER = r"""
import sys, threading, time
from budgetkit import Budget, Engine, BudgetExceeded
db, name, seconds, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
engine = Engine(db=db)
engine.add_budget(Budget(name=name, limit=1_000_000.0, period="total"))
counts = []
def work():
    n = 0
    while time.time() < start_at:
        time.sleep(0.001)
    while time.time() < start_at + seconds:
        t = engine.admit("gpt-4o-mini", input_tokens=500, max_output_tokens=200)
        engine.settle(t, output_tokens=100)
        n += 1
    counts.append(n)
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
engine.close()
print(sum(counts))
"""


def sustained(db: str, seconds: float, processes: int = 4) -> float:
    name = f"shared-{uuid.uuid4().hex[:6]}"
    Engine(db=db).close()  # tables exist before the workers race
    start_at = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, db, name, str(seconds),
                               str(start_at)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
             for _ in range(processes)]
    total = sum(int(proc.communicate()[0].strip()) for proc in procs)
    close_removing(Engine(db=db), [name])  # the workers' shared budget
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pg", default=os.environ.get("BUDGETKIT_TEST_POSTGRES_URL"))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args()
    stages = Stages(args.quiet)
    databases = {"SQLite file": None}
    if args.pg:
        databases["PostgreSQL"] = args.pg
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, url in databases.items():
            db = url or str(Path(tmp) / f"bench-{uuid.uuid4().hex[:6]}.db")
            base = None
            runs = [(0, True), (1, True), (3, True), (10, True)]
            if url:  # what waiting for PostgreSQL's WAL flush costs
                runs.append((3, False))
            for budgets, durable in runs:
                stages.say(f"{label}: admit + settle, {budgets} budgets"
                           + ("" if durable else ", durable=False"))
                admit_us, settle_us = per_call(db, budgets, args.calls, durable)
                total = admit_us + settle_us
                base = base or total
                results.append({"db": label if durable else f"{label} durable=False",
                                "budgets": budgets, "admit_us": admit_us,
                                "settle_us": settle_us, "total_us": total,
                                "ratio": total / base})
            for budgets in (1, 3, 10):
                stages.say(f"{label}: admission lane, {budgets} budgets")
                admit_us, after_us, declined = per_call_in_lane(db, budgets, args.calls)
                results.append({"db": label, "lane_budgets": budgets, "admit_us": admit_us,
                                "after_us": after_us, "declined": declined,
                                "calls": 3 * args.calls})
            stages.say(f"{label}: 4 processes x 4 threads for {args.seconds:g} s")
            rate = sustained(db, args.seconds)
            results.append({"db": label, "processes": 4, "calls_per_s": rate})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"admit + settle per call ({args.calls} calls, median of 3), "
          "ratio to the ledger-only engine on the same database")
    print(f"{'database':<25} {'budgets':>7} {'admit µs':>9} {'settle µs':>10} "
          f"{'total µs':>9} {'ratio':>6}")
    for row in results:
        if "budgets" in row:
            print(f"{row['db']:<25} {row['budgets']:>7} {row['admit_us']:>9.0f} "
                  f"{row['settle_us']:>10.0f} {row['total_us']:>9.0f} {row['ratio']:>5.1f}x")
    print("\nin an admission lane (adapters: the caller waits for the admit only; the "
          "ticket is built and settled after the call)")
    print(f"{'database':<25} {'budgets':>7} {'admit µs':>9} {'after µs':>9} "
          f"{'declined':>9}")
    for row in results:
        if "lane_budgets" in row:
            print(f"{row['db']:<25} {row['lane_budgets']:>7} {row['admit_us']:>9.1f} "
                  f"{row['after_us']:>9.1f} {row['declined']:>4} of {row['calls']}")
    print(f"\nsustained admitted calls/s, 4 processes x 4 threads, one shared budget, "
          f"{args.seconds:g} s")
    for row in results:
        if "processes" in row:
            print(f"{row['db']:<25} {row['calls_per_s']:>9.0f} calls/s")


if __name__ == "__main__":
    main()
