"""Fitting time vs history length: budgetkit.fit_messages vs LangChain's trim_messages.

    /work/venv/bin/python benchmarks/bench_fit.py [--window 8000] [--sizes 100,1000,2000,10000]

Every contender fits the same seeded history (system, user, assistant and tool-call blocks) to
the same window with the same exact counts (budgetkit.count_message_tokens on the OpenAI form
of each message), and must keep the same messages; the script checks that before timing.

Contenders, per history length:
  ours, dicts        budgetkit.fit_messages on OpenAI dicts; counts already cached (a chat
                     loop refits the same history plus one turn per call)
  ours, dicts, cold  the same on never-seen strings: the messages it reads (newest first, up
                     to the window) are tokenized
  cold + tokens_before  the same, then reading report.tokens_before, which counts the
                     dropped messages too (lazily, on first read)
  ours, LangChain    langchain_budgetkit.fit_messages on BaseMessages (converts the
                     messages it reads to OpenAI dicts; counts cached)
  trim, list counter trim_messages(strategy="last", include_system=True, start_on="human"),
                     token_counter(list) = count_message_tokens(convert_to_openai_messages(list))
  trim, memo counter the same with a per-message counter memoized by message identity
                     (the fastest counter trim_messages can be given)
Times are medians over repeated runs in one process; ratios are trim / ours (LangChain), the
like-for-like pair (same input objects, same output objects).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

from langchain_core.messages import (AIMessage, BaseMessage, HumanMessage, SystemMessage,
                                     ToolMessage, convert_to_openai_messages, trim_messages)

from budgetkit import count_message_tokens, fit_messages
from langchain_budgetkit import fit_messages as fit_langchain_messages

from _stages import Stages  # benchmarks/_stages.py, next to this script

MODEL = "gpt-4o"
PRIMING = count_message_tokens([], MODEL)
WORDS = ("budget token window model reply history tool call result alpha beta gamma delta "
         "über naïve 東京 emoji🙂 x=1; {json: true}").split()


def make_history(n: int, seed: int, salt: str = "") -> list[BaseMessage]:
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return salt + " ".join(rng.choices(WORDS, k=rng.randint(low, high)))

    messages: list[BaseMessage] = [SystemMessage(text(10, 40))]
    call = 0
    while len(messages) < n:
        messages.append(HumanMessage(text(3, 60)))
        if rng.random() < 0.3:
            call += 1
            messages.append(AIMessage("", tool_calls=[
                {"name": "lookup", "args": {"key": text(1, 3)}, "id": f"call_{call}"}]))
            messages.append(ToolMessage(text(5, 120), tool_call_id=f"call_{call}"))
        messages.append(AIMessage(text(5, 150)))
    return messages[:n]


def list_counter(messages: list[BaseMessage]) -> int:
    return count_message_tokens(convert_to_openai_messages(messages), MODEL) - PRIMING


def memo_counter() -> Callable[[BaseMessage], int]:
    memo: dict[int, int] = {}

    def counter(message: BaseMessage) -> int:
        key = id(message)
        if key not in memo:
            memo[key] = count_message_tokens(convert_to_openai_messages([message]), MODEL) - PRIMING
        return memo[key]

    counter.__annotations__["message"] = BaseMessage  # trim_messages looks for this annotation
    return counter


def trim(messages: list[BaseMessage], window: int, counter: Callable) -> list[BaseMessage]:
    return trim_messages(messages, max_tokens=window - PRIMING, token_counter=counter,
                         strategy="last", include_system=True, start_on="human",
                         allow_partial=False)


def median_seconds(run: Callable[[], object], *, budget: float = 0.6, at_least: int = 3,
                   at_most: int = 50) -> float:
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < at_most and (len(times) < at_least
                                    or time.perf_counter() - started < budget):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cold_seconds(n: int, window: int, rounds: int = 3, *, read_total: bool = False) -> float:
    """Fits of histories whose strings were never counted (fresh salt each round); with
    ``read_total``, also reading report.tokens_before, which counts the dropped messages."""
    times = []
    for r in range(rounds):
        salt = f"cold{r}-{read_total}-{time.time_ns()} "
        dicts = convert_to_openai_messages(make_history(n, seed=n, salt=salt))
        t0 = time.perf_counter()
        report = fit_messages(dicts, MODEL, max_tokens=window).report
        if read_total:
            report.tokens_before  # noqa: B018
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=8000)
    parser.add_argument("--sizes", default="100,1000,2000,10000")
    parser.add_argument("--quiet", action="store_true", help="print the table only")
    args = parser.parse_args()
    stages = Stages(args.quiet)
    sizes = [int(s) for s in args.sizes.split(",")]
    count_message_tokens([{"role": "user", "content": "warm up the encoding"}], MODEL)

    rows = []
    for n in sizes:
        stages.say(f"{n:,} messages: ours, trim_messages, then cold counts")
        history = make_history(n, seed=n)
        dicts = convert_to_openai_messages(history)
        ours = fit_messages(dicts, MODEL, max_tokens=args.window)  # also warms the counts
        ours_lc = fit_langchain_messages(history, MODEL, max_tokens=args.window)
        memo = memo_counter()
        theirs = trim(history, args.window, list_counter)
        if [id(m) for m in ours_lc.messages] != [id(m) for m in theirs] \
                or [id(m) for m in trim(history, args.window, memo)] != [id(m) for m in theirs] \
                or ours.report.kept != ours_lc.report.kept:
            print(f"n={n}: the contenders kept different messages; not timing", file=sys.stderr)
            return 1
        row = {
            "n": len(history),
            "kept": len(ours.messages),
            "ours": median_seconds(lambda: fit_messages(dicts, MODEL, max_tokens=args.window)),
            "ours_lc": median_seconds(
                lambda: fit_langchain_messages(history, MODEL, max_tokens=args.window)),
            "trim_list": median_seconds(lambda: trim(history, args.window, list_counter),
                                        at_least=2, at_most=10),
            "trim_memo": median_seconds(lambda: trim(history, args.window, memo)),
        }
        # last: these push other strings out of the caches
        row["cold"] = cold_seconds(n, args.window)
        row["cold_total"] = cold_seconds(n, args.window, read_total=True)
        rows.append(row)

    print(f"\nFitting a chat history to a {args.window}-token window ({MODEL}, exact counts), "
          f"Python {sys.version.split()[0]}\n")
    print("| messages | kept | ours, dicts | ours, dicts, cold | cold + tokens_before | "
          "ours, LangChain msgs | trim_messages, list counter | trim_messages, memo counter | "
          "list / ours-LC | memo / ours-LC |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['kept']} | {ms(r['ours'])} | {ms(r['cold'])} | "
              f"{ms(r['cold_total'])} | {ms(r['ours_lc'])} | {ms(r['trim_list'])} | "
              f"{ms(r['trim_memo'])} | {r['trim_list'] / r['ours_lc']:.1f}x | "
              f"{r['trim_memo'] / r['ours_lc']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
