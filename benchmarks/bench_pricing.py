"""Pricing and token counting, budgetkit vs its peers, measured side by side in one run.

    python -m venv .venv-bench
    .venv-bench/bin/pip install -e . -r benchmarks/requirements-peers.txt
    .venv-bench/bin/python benchmarks/bench_pricing.py

Peers: LiteLLM's ``cost_per_token`` (with its bundled local price map, no network) and
tokencost's ``count_message_tokens``, given the same tiktoken files offline (llama-index-core's
copy; budgetkit reads the identical files it ships).
Prints a markdown table; times are the median of 7 repeats.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path


def _bundled_tiktoken_dir() -> str | None:
    for entry in sys.path:
        candidate = Path(entry or ".") / "llama_index" / "core" / "_static" / "tiktoken_cache"
        if candidate.is_dir():
            return str(candidate)
    return None


# Peers download their BPE and price files unless told otherwise; this machine is offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
if "TIKTOKEN_CACHE_DIR" not in os.environ and (bundled := _bundled_tiktoken_dir()):
    os.environ["TIKTOKEN_CACHE_DIR"] = bundled

REPEATS = 7


def per_call_us(fn, number: int) -> float:
    fn()  # warm caches (price lookups, encodings)
    runs = timeit.repeat(fn, number=number, repeat=REPEATS)
    return statistics.median(runs) / number * 1e6


def import_seconds(module: str, runs: int = 5) -> float:
    """Median time of ``import module`` in a fresh interpreter, timed inside that interpreter.

    (Timing the whole subprocess and subtracting an empty interpreter's start-up gave negative
    figures when the machine was busy: the difference of two noisy numbers.)
    """
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    times = [float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                  text=True, env={**os.environ}).stdout.split()[-1])
             for _ in range(runs)]
    return statistics.median(times)


def ratio(ours: float, peer: float) -> str:
    """``peer / ours`` as "N.Nx faster", or "N.Nx slower" when budgetkit takes longer."""
    return f"{peer / ours:.1f}x faster" if peer >= ours else f"{ours / peer:.1f}x slower"


def conversation(n_turns: int, marker: str = "") -> list[dict[str, str]]:
    messages = [{"role": "system",
                 "content": f"{marker}You are a careful assistant for a retail bank."}]
    for i in range(n_turns):
        messages.append({"role": "user", "content": f"{marker}Question {i}: what is the fee for "
                                                    f"a wire transfer of {i * 37} EUR to Spain?"})
        messages.append({"role": "assistant",
                         "content": f"{marker}For {i * 37} EUR the fee is 0.2 %, at least 5 EUR, "
                                    "and it arrives in a day."})
    return messages


def progress(stage: str) -> None:
    print(f"measuring: {stage}", file=sys.stderr, flush=True)


def main() -> None:
    import litellm
    import tokencost

    import budgetkit

    rows: list[tuple[str, str, str, str]] = []

    progress("import time (fresh interpreters)")
    ours_import = import_seconds("budgetkit")
    litellm_import = import_seconds("litellm")
    rows.append(("import time", f"{ours_import * 1000:.0f} ms", f"{litellm_import * 1000:.0f} ms "
                 "(litellm)", ratio(ours_import, litellm_import)))

    progress("cost of one call")

    ours = per_call_us(lambda: budgetkit.estimate_cost("gpt-4o", 1000, 200), 20_000)
    peer = per_call_us(lambda: litellm.cost_per_token(model="gpt-4o", prompt_tokens=1000,
                                                      completion_tokens=200), 500)
    same = abs(sum(litellm.cost_per_token(model="gpt-4o", prompt_tokens=1000,
                                          completion_tokens=200))
               - budgetkit.estimate_cost("gpt-4o", 1000, 200)) < 1e-12
    rows.append(("cost of one call (gpt-4o)", f"{ours:.2f} µs", f"{peer:.1f} µs (litellm)",
                 f"{ratio(ours, peer)}; same USD: {same}"))

    ours = per_call_us(lambda: budgetkit.estimate_cost("gpt-4o-2024-08-06", 1000, 200), 20_000)
    peer = per_call_us(lambda: litellm.cost_per_token(model="gpt-4o-2024-08-06",
                                                      prompt_tokens=1000,
                                                      completion_tokens=200), 500)
    rows.append(("cost of one call (dated snapshot)", f"{ours:.2f} µs",
                 f"{peer:.1f} µs (litellm)", ratio(ours, peer)))

    progress("counting repeated messages")
    for label, messages in (("count 6 messages", conversation(2)[:6]),
                            ("count 201 messages", conversation(100))):
        for model in ("gpt-4o", "gpt-4"):
            ours_count = budgetkit.count_message_tokens(messages, model)
            peer_count = tokencost.count_message_tokens(messages, model)
            ours = per_call_us(lambda: budgetkit.count_message_tokens(messages, model), 200)
            peer = per_call_us(lambda: tokencost.count_message_tokens(messages, model), 20)
            rows.append((f"{label} ({model})", f"{ours:.1f} µs → {ours_count}",
                         f"{peer:.1f} µs → {peer_count} (tokencost)",
                         f"{ratio(ours, peer)}; same count: {ours_count == peer_count}"))

    # The rows above repeat the same messages, so budgetkit's count cache is warm (as it is for
    # a growing chat history). First count: every call counts a conversation never seen before
    # (each message carries a fresh number), so nothing is cached; tokencost caches nothing.
    # Built before timing, so neither side pays for making them.
    calls = 1 + 50 * REPEATS
    ours_fresh = iter([conversation(100, marker=f"#{k} ") for k in range(calls)])
    peer_fresh = iter([conversation(100, marker=f"#{k} ") for k in range(calls, 2 * calls)])

    def first_count_ours() -> int:
        return budgetkit.count_message_tokens(next(ours_fresh), "gpt-4o")

    def first_count_peer() -> int:
        return tokencost.count_message_tokens(next(peer_fresh), "gpt-4o")

    progress("first count of new conversations")
    ours = per_call_us(first_count_ours, 50)
    peer = per_call_us(first_count_peer, 50)
    rows.append(("count 201 new messages (gpt-4o), first count", f"{ours:.1f} µs",
                 f"{peer:.1f} µs (tokencost)",
                 f"{ratio(ours, peer)} (budgetkit/tokencost time {ours / peer:.2f})"))

    print(f"\nMeasured {time.strftime('%Y-%m-%d')} on {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; "
          f"litellm {litellm_version()}, tokencost {pkg_version('tokencost')}\n")
    print("| measure | budgetkit | peer | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def pkg_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def litellm_version() -> str:
    return pkg_version("litellm")


if __name__ == "__main__":
    main()
