"""Pricing and token counting, budgetkit vs its peers, measured side by side in one run.

    python -m venv .venv-bench
    .venv-bench/bin/pip install -e . -r benchmarks/requirements-peers.txt
    .venv-bench/bin/python benchmarks/bench_pricing.py

Peers: LiteLLM's ``cost_per_token`` (with its bundled local price map, no network) and
tokencost's ``count_message_tokens``. Both are pointed at the same offline tiktoken files.
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


def import_seconds(module: str) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True,
                       env={**os.environ})
        times.append(time.perf_counter() - start)
    base = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        base.append(time.perf_counter() - start)
    return min(times) - min(base)


def conversation(n_turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a careful assistant for a retail bank."}]
    for i in range(n_turns):
        messages.append({"role": "user", "content": f"Question {i}: what is the fee for a "
                                                    f"wire transfer of {i * 37} EUR to Spain?"})
        messages.append({"role": "assistant", "content": f"For {i * 37} EUR the fee is 0.2 %, "
                                                         "at least 5 EUR, and it arrives in a day."})
    return messages


def main() -> None:
    import litellm
    import tokencost

    import budgetkit

    rows: list[tuple[str, str, str, str]] = []

    ours_import = import_seconds("budgetkit")
    litellm_import = import_seconds("litellm")
    rows.append(("import time", f"{ours_import * 1000:.0f} ms", f"{litellm_import * 1000:.0f} ms "
                 "(litellm)", f"{litellm_import / ours_import:.0f}x faster"))

    ours = per_call_us(lambda: budgetkit.estimate_cost("gpt-4o", 1000, 200), 20_000)
    peer = per_call_us(lambda: litellm.cost_per_token(model="gpt-4o", prompt_tokens=1000,
                                                      completion_tokens=200), 500)
    same = abs(sum(litellm.cost_per_token(model="gpt-4o", prompt_tokens=1000,
                                          completion_tokens=200))
               - budgetkit.estimate_cost("gpt-4o", 1000, 200)) < 1e-12
    rows.append(("cost of one call (gpt-4o)", f"{ours:.2f} µs", f"{peer:.1f} µs (litellm)",
                 f"{peer / ours:.0f}x faster; same USD: {same}"))

    ours = per_call_us(lambda: budgetkit.estimate_cost("gpt-4o-2024-08-06", 1000, 200), 20_000)
    peer = per_call_us(lambda: litellm.cost_per_token(model="gpt-4o-2024-08-06",
                                                      prompt_tokens=1000,
                                                      completion_tokens=200), 500)
    rows.append(("cost of one call (dated snapshot)", f"{ours:.2f} µs",
                 f"{peer:.1f} µs (litellm)", f"{peer / ours:.0f}x faster"))

    for label, messages in (("count 6 messages", conversation(2)[:6]),
                            ("count 201 messages", conversation(100))):
        for model in ("gpt-4o", "gpt-4"):
            ours_count = budgetkit.count_message_tokens(messages, model)
            peer_count = tokencost.count_message_tokens(messages, model)
            ours = per_call_us(lambda: budgetkit.count_message_tokens(messages, model), 200)
            peer = per_call_us(lambda: tokencost.count_message_tokens(messages, model), 20)
            rows.append((f"{label} ({model})", f"{ours:.1f} µs → {ours_count}",
                         f"{peer:.1f} µs → {peer_count} (tokencost)",
                         f"{peer / ours:.1f}x faster; same count: {ours_count == peer_count}"))

    # The rows above repeat the same messages, so budgetkit's count cache is warm (as it is for
    # a growing chat history). Cold: the cache is cleared before every count.
    from budgetkit.pricing import _tokens

    messages = conversation(100)

    def cold() -> int:
        _tokens._count_cache.clear()
        return budgetkit.count_message_tokens(messages, "gpt-4o")

    ours = per_call_us(cold, 50)
    peer = per_call_us(lambda: tokencost.count_message_tokens(messages, "gpt-4o"), 20)
    rows.append(("count 201 messages (gpt-4o), cold cache", f"{ours:.1f} µs", f"{peer:.1f} µs "
                 "(tokencost)", f"{peer / ours:.1f}x faster"))

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
