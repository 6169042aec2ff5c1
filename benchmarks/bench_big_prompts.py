"""Huge prompts: time and peak memory to count and to fit 10 MB of prose vs one 10 MB word.

    /work/venv/bin/python benchmarks/bench_big_prompts.py [--mb 10] [--model gpt-4o]

Inputs (seeded): "prose" is words of 1-12 random lower-case letters separated by spaces,
commas, full stops and newlines; "one word" is the same number of random lower-case
letters with no whitespace at all (tiktoken's worst case: one pre-token).

Rows, each run in a fresh subprocess (so peak memory is its own):
  count, budgetkit        budgetkit.count_tokens (pieces cut at exact boundaries, see
                          budgetkit/pricing/_long_text.py)
  count, tiktoken whole   len(encoding.encode(text)) on the whole text: what budgetkit did
                          before, and what a caller of tiktoken does
  fit, budgetkit          budgetkit.fit_messages([system, user(text)], model): the user
                          message is cut in the middle to the model's window
  fit, whole-text encode  the least the old fitter did: encode the whole text once, decode
                          the kept head and tail, count the result once

Time is wall-clock of the call; peak memory is the subprocess's peak RSS growth during the
call (the kernel's VmHWM, reset just before the call, minus the RSS before it: tiktoken's
own allocations are native, so tracemalloc would miss them). Linux only. Ratios are baseline / budgetkit.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import string
import subprocess
import sys
import time
from typing import Any

ROWS = [("count", "budgetkit"), ("count", "baseline"), ("fit", "budgetkit"),
        ("fit", "baseline")]
INPUTS = ("prose", "one word")


def make_text(kind: str, size: int) -> str:
    rng = random.Random(18)
    if kind == "one word":
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
        head = encoding.decode(tokens[: keep - keep // 2])
        tail = encoding.decode(tokens[len(tokens) - keep // 2:])
        result = len(encoding.encode(head + "…" + tail, disallowed_special=()))
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    return {"seconds": seconds, "peak_mb": max(0, peak - before) / 1e6, "result": result}


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
    print(f"{args.mb:g} MB texts, model {args.model}; each row in a fresh process", flush=True)
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    for kind in INPUTS:
        for op, who in ROWS:
            print(f"  measuring {op} / {who} / {kind} ...", file=sys.stderr, flush=True)
            results[(op, who, kind)] = run_row(op, who, kind, size, args.model)
    header = (f"| input | operation | budgetkit s | budgetkit peak MB | baseline s | "
              f"baseline peak MB | time ratio | memory ratio | tokens (budgetkit / baseline) |")
    print(header)
    print("|" + "---|" * 9)
    for kind in INPUTS:
        for op in ("count", "fit"):
            ours, base = results[(op, "budgetkit", kind)], results[(op, "baseline", kind)]
            print(f"| {kind} | {op} | {ours['seconds']:.2f} | {ours['peak_mb']:.0f} | "
                  f"{base['seconds']:.2f} | {base['peak_mb']:.0f} | "
                  f"{base['seconds'] / ours['seconds']:.1f}x | "
                  f"{base['peak_mb'] / max(ours['peak_mb'], 1):.1f}x | "
                  f"{ours['result']:,} / {base['result']:,} |")
    per_char = {kind: results[("count", "budgetkit", kind)]["seconds"] / size * 1e6
                for kind in INPUTS}
    print(f"\nbudgetkit count: {per_char['prose']:.3f} µs/char prose, "
          f"{per_char['one word']:.3f} µs/char one word")


if __name__ == "__main__":
    main()
