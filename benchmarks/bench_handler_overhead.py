"""Per-call overhead of budgetkit's LangChain handler vs langchain-core's usage handler.

One process, one fake chat model (answers at once and reports ``usage_metadata``, like a
provider integration), three ways of calling it, interleaved round by round so machine noise
hits all of them alike:

- ``bare``: no callbacks;
- ``UsageMetadataCallbackHandler``: langchain-core's built-in usage counter (sums tokens
  in memory: no pricing, no persistence);
- ``BudgetkitCallbackHandler``: admits (prices the worst case; with no budget the prompt
  is counted only if the provider reports no usage), settles (prices the reported usage),
  and hands the row to the background writer of a SQLite ledger (WAL file in a temporary
  folder);
- the same handler on a second ledger with ``--budgets`` budgets (default 3: global, per
  user, per project; limits never reached), so every admit reserves and every settle
  commits in each budget's window;
- the handler on a third ledger with the journal off (``Engine(journal=False)``): what the
  journal (one ``write()`` per row before the call returns, see docs/reliability.md) costs.

Overhead = a handler's per-call latency minus the bare call's, at p50 and p99.

    python benchmarks/bench_handler_overhead.py [--calls 250] [--rounds 40] [--budgets 3]
                                                [--unique-prompts]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from budgetkit import Budget, Engine
from langchain_budgetkit import BudgetkitCallbackHandler

from _stages import Stages  # benchmarks/_stages.py, next to this script

PROMPT = [SystemMessage("You are a helpful assistant for an online shop."),
          HumanMessage("Where is my order #1234? It was due yesterday.")]


class FakeChatModel(BaseChatModel):
    model_name: str = "gpt-4o-mini"

    @property
    def _llm_type(self) -> str:
        return "bench-fake-chat"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        message = AIMessage(
            content="Your order ships today.",
            response_metadata={"model_name": "gpt-4o-mini-2024-07-18"},
            usage_metadata={"input_tokens": 31, "output_tokens": 6, "total_tokens": 37,
                            "input_token_details": {"cache_read": 0},
                            "output_token_details": {"reasoning": 0}})
        return ChatResult(generations=[ChatGeneration(message=message)])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def prompts(calls: int, unique: bool) -> list[list[Any]]:
    """The prompts of one round: the same one, or each its own (no token-count cache hit),
    as real traffic is."""
    if not unique:
        return [PROMPT] * calls
    return [[PROMPT[0], HumanMessage(f"Where is my order #{random.randrange(10**9)}? It was "
                                     f"due {random.choice(DAYS)}; ticket {random.random()}.")]
            for _ in range(calls)]


DAYS = ("yesterday", "on Monday", "last week", "two days ago")


def time_calls(model: FakeChatModel, config: dict[str, Any], calls: int,
               unique: bool = False, engine: Engine | None = None) -> tuple[list[float], float]:
    """Each call's latency (µs), and the process's CPU time for them all (s), counting
    the work the calls left to background threads (the engine is flushed inside)."""
    latencies = []
    clock = time.perf_counter_ns
    batch = prompts(calls, unique)
    cpu = time.process_time()
    for prompt in batch:
        start = clock()
        model.invoke(prompt, config=config)
        latencies.append((clock() - start) / 1000.0)  # µs
    if engine is not None:  # its background work is counted in this round's CPU; the
        engine.flush(return_leases=False)  # budget leases stay, as in an app's steady state
    return latencies, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=250, help="calls per condition per round")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--unique-prompts", action="store_true",
                        help="a different prompt per call (default: one repeated prompt)")
    parser.add_argument("--budgets", type=int, default=3,
                        help="budgets of the last condition (0: leave it out)")
    parser.add_argument("--quiet", action="store_true", help="print the table only")
    args = parser.parse_args()
    stages = Stages(args.quiet)

    model = FakeChatModel()
    with tempfile.TemporaryDirectory() as folder, \
            Engine(db=str(Path(folder) / "bench.db")) as engine, \
            Engine(db=str(Path(folder) / "budgets.db")) as budget_engine, \
            Engine(db=str(Path(folder) / "nojournal.db"), journal=False) as bare_engine:
        usage_handler = UsageMetadataCallbackHandler()
        budget_handler = BudgetkitCallbackHandler(engine, user_id="bench", project="bench")
        conditions = {
            "bare (no callbacks)": {},
            "UsageMetadataCallbackHandler": {"callbacks": [usage_handler]},
            "BudgetkitCallbackHandler (SQLite)": {"callbacks": [budget_handler]},
            "BudgetkitCallbackHandler (no journal)": {"callbacks": [
                BudgetkitCallbackHandler(bare_engine, user_id="bench", project="bench")]},
        }
        if args.budgets:
            for index in range(args.budgets):
                scope = ("global", "user", "project")[index % 3]
                budget_engine.add_budget(Budget(
                    name=f"bench-{index}", limit=1_000_000.0, scope=scope,
                    match={"global": None, "user": "bench", "project": "bench"}[scope]))
            with_budgets = BudgetkitCallbackHandler(budget_engine, user_id="bench",
                                                    project="bench")
            conditions[f"BudgetkitCallbackHandler ({args.budgets} budgets)"] = {
                "callbacks": [with_budgets]}
        engines = {name: None for name in conditions}
        engines["BudgetkitCallbackHandler (SQLite)"] = engine
        engines["BudgetkitCallbackHandler (no journal)"] = bare_engine
        for name in conditions:
            if "budgets)" in name:
                engines[name] = budget_engine
        samples: dict[str, list[float]] = {name: [] for name in conditions}
        round_p50s: dict[str, list[float]] = {name: [] for name in conditions}
        cpu: dict[str, float] = {name: 0.0 for name in conditions}
        stages.say("warming up every condition")
        for name, config in conditions.items():  # warm up imports, caches, the writer
            time_calls(model, config, 300, engine=engines[name])
        for round_index in stages.items(range(args.rounds),
                                        f"{args.rounds} rounds of {args.calls} calls each"):
            order = list(conditions.items())
            if round_index % 2:  # every other round backwards: no condition always follows
                order.reverse()  # the same one (whose leftovers, GC, could weigh on it)
            for name, config in order:
                latencies, seconds = time_calls(model, config, args.calls,
                                                args.unique_prompts, engines[name])
                samples[name].extend(latencies)
                round_p50s[name].append(percentile(latencies, 0.50))
                cpu[name] += seconds
        assert engine.flush(timeout=60) and budget_engine.flush(timeout=60)
        recorded = len(engine.usage(user_id="bench"))
        recorded_budgets = len(budget_engine.usage(user_id="bench"))

    bare = "bare (no callbacks)"
    bare99 = percentile(samples[bare], 0.99)
    total = args.calls * args.rounds
    bare_cpu = cpu[bare] / total * 1e6
    rows = []
    for name, values in samples.items():
        p50, p99 = percentile(values, 0.50), percentile(values, 0.99)
        cpu_us = cpu[name] / total * 1e6
        # Added p50: the median over rounds of (this p50 - the bare p50 of the same
        # round), so that the machine's drift between rounds cancels out.
        added50 = statistics.median(mine - theirs for mine, theirs
                                    in zip(round_p50s[name], round_p50s[bare]))
        rows.append((name, p50, p99, added50, p99 - bare99, cpu_us - bare_cpu))
    usage_added, usage_cpu = rows[1][3], rows[1][5]
    print(f"{total} calls per condition ({args.rounds} interleaved rounds, "
          f"{'a new prompt per call' if args.unique_prompts else 'one repeated prompt'}), "
          f"latencies in µs; added p50: median over rounds of the round's p50 over the "
          f"bare call's; added p99: over all calls; added CPU: the process's CPU time per "
          f"call over the bare call's, background threads included\n")
    print(f"| {'condition':<38} | {'p50':>7} | {'p99':>7} | {'added p50':>9} | "
          f"{'added p99':>9} | {'added CPU':>9} | {'vs usage (p50)':>14} | "
          f"{'vs usage (CPU)':>14} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 16}|"
          f"{'-' * 16}|")
    for name, p50, p99, add50, add99, add_cpu in rows:
        is_bare = name == bare
        ratio = "" if is_bare else f"{add50 / usage_added:.2f}x"
        cpu_ratio = "" if is_bare else f"{add_cpu / usage_cpu:.2f}x"
        print(f"| {name:<38} | {p50:7.1f} | {p99:7.1f} | {add50:9.1f} | {add99:9.1f} | "
              f"{add_cpu:9.1f} | {ratio:>14} | {cpu_ratio:>14} |")
    print(f"\nbudgetkit rows written: {recorded} (every warm-up and timed call: "
          f"{300 + total})" + (f"; with budgets: {recorded_budgets}" if args.budgets else ""))


if __name__ == "__main__":
    main()
