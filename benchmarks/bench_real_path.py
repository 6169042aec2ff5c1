"""The real path: what budgetkit adds to a LangChain call over HTTP, in whole-process CPU.

``ChatOpenAI`` calls a local OpenAI-compatible server (:class:`budgetkit.testing.
FakeOpenAIServer`, run in a *separate* process so its work is not counted) in interleaved
rounds of four conditions: no callbacks, langchain-core's ``UsageMetadataCallbackHandler``
(the peer), and budgetkit's handler on a SQLite ledger, without and with three budgets.
CPU is ``time.process_time()`` of this process over the round (every thread: the ledger
writer, the budget settler, the deferred bookkeeping), and each budgetkit round ends with
``engine.flush(return_leases=False)`` so the rows' writing is inside it.

Also: the process CPU per second of an engine that is open but idle (background threads
waking up), and how long ``engine.flush()`` waits for 100 queued rows next to inserting
the same 100 rows directly on the caller's thread (the database's own floor).

    python benchmarks/bench_real_path.py [--calls 200] [--rounds 10] [--latency 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_openai import ChatOpenAI

from budgetkit import Budget, Engine
from budgetkit.ledger import new_id
from langchain_budgetkit import BudgetkitCallbackHandler

_SERVER = ("import sys; from budgetkit.testing import FakeOpenAIServer; "
           "s = FakeOpenAIServer(reply='Your order ships today.', prompt_tokens=31, "
           "completion_tokens=6, latency=float(sys.argv[1])).start(); "
           "print(s.base_url, flush=True); sys.stdin.read()")
PROMPT = "Where is my order #1234? It was due yesterday."


def _round(model: ChatOpenAI, config: dict[str, Any], calls: int,
           engine: Engine | None) -> tuple[float, float]:
    """(median wall ms per call, CPU ms per call) of one round."""
    walls = []
    cpu = time.process_time()
    for _ in range(calls):
        start = time.perf_counter()
        model.invoke(PROMPT, config=config)
        walls.append((time.perf_counter() - start) * 1000)
    if engine is not None:
        engine.flush(return_leases=False)
    return statistics.median(walls), (time.process_time() - cpu) * 1000 / calls


def _idle_cpu(seconds: float, folder: Path) -> tuple[float, float]:
    """Process CPU ms per second: with no engine, then with an engine open and idle."""
    start = time.process_time()
    time.sleep(seconds)
    bare = (time.process_time() - start) * 1000 / seconds
    with Engine(db=str(folder / "idle.db")) as engine:
        engine.add_budget(Budget(name="idle", limit=100.0), shared=False)
        engine.settle(engine.admit("gpt-4o-mini", input_tokens=10), output_tokens=1)
        engine.flush()
        start = time.process_time()
        time.sleep(seconds)
        idle = (time.process_time() - start) * 1000 / seconds
    return bare, idle


def _flush_waits(folder: Path, repeats: int) -> tuple[list[float], list[float]]:
    """ms that flush() waits for 100 queued rows; ms to insert 100 rows directly."""
    waits, direct = [], []
    with Engine(db=str(folder / "flush.db")) as engine:
        captured: list[dict[str, Any]] = []
        for index in range(100):
            engine.record("gpt-4o-mini", input_tokens=31, output_tokens=6,
                          user_id=f"user-{index % 5}", request_id=f"r{index}")
        engine.flush()
        sample = engine.usage(limit=100)
        columns = [column for column in sample[0].model_fields if column != "metadata_"]
        for row in sample:
            values = {name: getattr(row, name) for name in columns}
            values["metadata"] = {}
            captured.append(values)
        for _ in range(repeats):
            for index in range(100):
                engine.record("gpt-4o-mini", input_tokens=31, output_tokens=6,
                              user_id=f"user-{index % 5}", request_id=f"r{index}")
            time.sleep(0.002)  # queued, as in an app between two batches
            start = time.perf_counter()
            engine.flush()
            waits.append((time.perf_counter() - start) * 1000)
            rows = [dict(values, id=new_id()) for values in captured]
            start = time.perf_counter()
            engine.store.insert_usage(rows)
            direct.append((time.perf_counter() - start) * 1000)
    return waits, direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per condition per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.0,
                        help="the server's delay per answer, seconds")
    parser.add_argument("--flushes", type=int, default=40)
    args = parser.parse_args()

    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(args.latency)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    base_url = server.stdout.readline().strip()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model = ChatOpenAI(model="gpt-4o-mini", base_url=base_url, api_key="sk-test",
                               max_retries=0)
            ledger = Engine(db=str(folder / "ledger.db"))
            budgeted = Engine(db=str(folder / "budgets.db"))
            for index, scope in enumerate(("global", "user", "project")):
                budgeted.add_budget(Budget(name=f"b{index}", limit=1_000_000.0, scope=scope,
                                           match=None if scope == "global" else "bench"))
            conditions: dict[str, tuple[dict[str, Any], Engine | None]] = {
                "ChatOpenAI, no callbacks": ({}, None),
                "UsageMetadataCallbackHandler": (
                    {"callbacks": [UsageMetadataCallbackHandler()]}, None),
                "BudgetkitCallbackHandler, SQLite": (
                    {"callbacks": [BudgetkitCallbackHandler(ledger, user_id="bench",
                                                            project="bench")]}, ledger),
                "BudgetkitCallbackHandler, 3 budgets": (
                    {"callbacks": [BudgetkitCallbackHandler(budgeted, user_id="bench",
                                                            project="bench")]}, budgeted),
            }
            for config, engine in conditions.values():  # warm up connections and caches
                _round(model, config, 50, engine)
            walls: dict[str, list[float]] = {name: [] for name in conditions}
            cpus: dict[str, list[float]] = {name: [] for name in conditions}
            for round_index in range(args.rounds):
                order = list(conditions.items())
                if round_index % 2:
                    order.reverse()
                for name, (config, engine) in order:
                    wall, cpu = _round(model, config, args.calls, engine)
                    walls[name].append(wall)
                    cpus[name].append(cpu)
                print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
            ledger.close()
            budgeted.close()
            bare_idle, engine_idle = _idle_cpu(3.0, folder)
            waits, direct = _flush_waits(folder, args.flushes)
    finally:
        server.terminate()
        server.wait(timeout=10)

    base = "ChatOpenAI, no callbacks"
    peer = "UsageMetadataCallbackHandler"
    base_cpu = statistics.median(cpus[base])
    peer_added = statistics.median(cpus[peer]) - base_cpu
    print(f"\n{args.rounds} interleaved rounds of {args.calls} calls per condition; server "
          f"latency {args.latency * 1000:g} ms (its own process); CPU = this process's "
          f"CPU time per call, every thread, median over rounds\n")
    print("| condition | wall p50 (ms) | CPU per call (ms) | added CPU (ms) | CPU vs no "
          "callbacks | added CPU vs usage handler |")
    print("|---|---|---|---|---|---|")
    for name in conditions:
        cpu = statistics.median(cpus[name])
        added = cpu - base_cpu
        versus = "" if name in (base, peer) or peer_added <= 0 else f"{added / peer_added:.1f}x"
        print(f"| {name} | {statistics.median(walls[name]):.2f} | {cpu:.3f} | "
              f"{added:+.3f} | {cpu / base_cpu:.2f}x | {versus} |")
    print(f"\nidle process CPU: {bare_idle:.2f} ms/s without an engine, {engine_idle:.2f} ms/s "
          f"with an engine open and idle (ledger writer + budget settler threads)")
    waits.sort()
    direct.sort()
    print(f"\nflush() of 100 queued rows, {len(waits)} times: p50 {statistics.median(waits):.1f} ms, "
          f"p90 {waits[int(0.9 * len(waits))]:.1f} ms; the same 100 rows inserted directly: "
          f"p50 {statistics.median(direct):.1f} ms, p90 {direct[int(0.9 * len(direct))]:.1f} ms "
          f"(flush / direct at p50: {statistics.median(waits) / statistics.median(direct):.2f}x)")


if __name__ == "__main__":
    main()
