"""Huge prompts: time and peak memory to count and to fit 10 MB of prose vs one 10 MB word.

    /work/venv/bin/python benchmarks/bench_big_prompts.py [--mb 10] [--model gpt-4o]

Inputs (seeded): "prose" is words of 1-12 random lower-case letters separated by spaces,
commas, full stops and newlines; "one word aaa" is one letter repeated (no whitespace: one
pre-token whose merges are easy); "one random word" is random lower-case letters with no
whitespace (one pre-token, and tiktoken's slowest merging we found).

Rows, each run in a fresh subprocess (so peak memory is its own):
  count, budgetkit        budgetkit.count_tokens (pieces cut at exact boundaries, see
                          budgetkit/pricing/_long_text.py)
  count, tiktoken whole   len(encoding.encode(text)) on the whole text: what budgetkit did
                          before, and what a caller of tiktoken does
  fit, budgetkit          budgetkit.fit_messages([system, user(text)], model): the user
                          message is cut in the middle to the model's window
  fit, whole-text encode  the least the old fitter did: encode the whole text once, decode
                          the kept head and tail, count the result once

Time is the process's CPU time during the call (wall-clock beside it: on a shared machine
wall-clock mostly measures the other processes); peak memory is the subprocess's peak RSS growth during the
call (the kernel's VmHWM, reset just before the call, minus the RSS before it: tiktoken's
own allocations are native, so tracemalloc would miss them). Linux only. Ratios are baseline / budgetkit (CPU time; peak memory, budgetkit's floored at 1 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import time
from typing import Any

ROWS = [("count", "budgetkit"), ("count", "baseline"), ("fit", "budgetkit"),
        ("fit", "baseline")]
INPUTS = ("prose", "one word aaa", "one random word")


def make_text(kind: str, size: int) -> str:
    rng = random.Random(18)
    if kind == "one word aaa":
        return "a" * size
    if kind == "one random word":
        return "".join(rng.choices(string.ascii_lowercase, k=size))
    parts: list[str] = []
    length = 0
    while length < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 12)))
        gap = rng.choice([" ", " ", " ", " ", ", ", ". ", "\n"])
        parts.append(word + gap)
        length += len(word) + len(gap)
    return "".join(parts)[:size]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> None:
    """Start the kernel's peak-RSS mark (VmHWM) afresh: building the input must not count."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _peak_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(op: str, who: str, kind: str, size: int, model: str) -> dict[str, Any]:
    """One row, in this process: seconds and peak RSS growth in MB."""
    import budgetkit
    from budgetkit.pricing import encoding_for_model

    text = make_text(kind, size)
    encoding = encoding_for_model(model)
    encoding.encode_ordinary("warm up")  # load the BPE before measuring
    budgetkit.count_tokens("warm up", model)
    import gc

    gc.collect()
    _reset_peak()
    before = _rss_bytes()
    cpu_start = time.process_time()
    start = time.perf_counter()
    if op == "count" and who == "budgetkit":
        result = budgetkit.count_tokens(text, model)
    elif op == "count":
        result = len(encoding.encode(text, disallowed_special=()))
    elif who == "budgetkit":
        fitted = budgetkit.fit_messages(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
            model)
        result = fitted.report.tokens_after
    else:
        tokens = encoding.encode(text, disallowed_special=())
        keep = budgetkit.prompt_token_limit(model) - 100
        if len(tokens) <= keep:
            return {"seconds": time.perf_counter() - start, "peak_mb": 0.0,
                    "cpu": time.process_time() - cpu_start, "result": len(tokens)}
        head = encoding.decode(tokens[: keep - keep // 2])
        tail = encoding.decode(tokens[len(tokens) - keep // 2:])
        result = len(encoding.encode(head + "…" + tail, disallowed_special=()))
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    peak = _peak_bytes()
    return {"seconds": seconds, "cpu": cpu, "peak_mb": max(0, peak - before) / 1e6,
            "result": result}


def run_row(op: str, who: str, kind: str, size: int, model: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps([op, who, kind, size, model])],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="text size in MB (default 10)")
    parser.add_argument("--model", default="gpt-4o")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    size = int(args.mb * 1_000_000)
    load = os.getloadavg()[0]
    print(f"{args.mb:g} MB texts, model {args.model}; each row in a fresh process; "
          f"load average at start {load:.1f} on {os.cpu_count()} CPUs", flush=True)
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    for kind in INPUTS:
        for op, who in ROWS:
            print(f"  measuring {op} / {who} / {kind} ...", file=sys.stderr, flush=True)
            results[(op, who, kind)] = run_row(op, who, kind, size, args.model)
    print("| input | operation | budgetkit CPU s (wall) | budgetkit peak MB | baseline CPU s "
          "(wall) | baseline peak MB | CPU ratio | memory ratio | tokens (budgetkit / "
          "baseline) |")
    print("|" + "---|" * 9)
    for kind in INPUTS:
        for op in ("count", "fit"):
            ours, base = results[(op, "budgetkit", kind)], results[(op, "baseline", kind)]
            print(f"| {kind} | {op} | {ours['cpu']:.2f} ({ours['seconds']:.2f}) | "
                  f"{ours['peak_mb']:.0f} | {base['cpu']:.2f} ({base['seconds']:.2f}) | "
                  f"{base['peak_mb']:.0f} | {base['cpu'] / ours['cpu']:.1f}x | "
                  f"{base['peak_mb'] / max(ours['peak_mb'], 1):.0f}x | "
                  f"{ours['result']:,} / {base['result']:,} |")
    per_char = ", ".join(
        f"{results[('count', 'budgetkit', kind)]['cpu'] / size * 1e6:.3f} µs/char {kind}"
        for kind in INPUTS)
    print(f"\nbudgetkit count, CPU: {per_char}; load average at end "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
