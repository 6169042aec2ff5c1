"""Router and cascade evaluation on real model outcomes (RouteLLM's GSM8K and MT-Bench data).

Data and metrics: benchmarks/routing_data.py (``../shared/data/routing-eval``, Apache-2.0;
strong gpt-4-1106-preview, cheap Mixtral-8x7B). APGR = area under the
performance-gap-recovered curve as strong calls go from 0 to 100 % (random 0.5); CPT(x) =
strong-call share needed to recover x of the gap (random: x).

Router table, per benchmark, side by side in one run:

* random (expected), longest prompt first (chars), the old ``complexity_score`` heuristic;
* the shipped recipe *zero-shot*: benchmarks/train_router.py's recipe trained on the OTHER
  benchmark only (the shipped file itself saw both, so it is not a fair row here);
* the scorer after ``fit``: that zero-shot scorer fitted on one half of this benchmark's
  outcomes and scored on the other half (2 folds by question, ``--repeats`` random splits;
  a prompt is never scored by a scorer that trained on it);
* the same on the fixed holdout half (``routing_data.holdout_mask``) that chose nothing:
  fit on the other half, scored once on it;
* the paired bootstrap 95 % interval of each row's APGR minus longest-first's.

Cascade table (GSM8K, where the cheap model's real answer text exists): false accepts (wrong
cheap answers accepted / all accepted), escalation share and accuracy for each combination
of checks, all run through ``budgetkit.Cascade.evaluate``; the learned answer check's
threshold is chosen on the other half, and it is reported on the holdout half.

Run:  python benchmarks/bench_routing.py [--quiet]      (18 s of CPU)
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from budgetkit import Router, count_tokens
from budgetkit.routing import (Cascade, MatchesRegex, Scorer, ScorerCheck, complexity_score,
                               default_scorer)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_data import (DEFAULT_DATA, Bench, apgr, bootstrap_diff, cpt,  # noqa: E402
                          holdout_mask, load_gsm8k, load_mt_bench)
from train_router import train  # noqa: E402

# RouteLLM's published figures (Ong et al. 2024, arXiv 2406.18665), for reference only: their
# routers learn from Chatbot Arena preferences (+ augmentation) and are scored on whole sets.
PUBLISHED = [
    "RouteLLM, MT Bench: best router (matrix factorisation, Arena + GPT-4-judge data) "
    "APGR 0.802",
    "RouteLLM, summary: 95 % of GPT-4's quality at over 85 % (MT Bench), 45 % (MMLU), 35 % "
    "(GSM8K) lower cost than GPT-4 only",
]

Say = Callable[[str], None]
ANSWER_PRIOR = (10.0, 1.0)  # dev-half 5-fold CV: AUC 0.695 vs 0.653 at the routing default


# ------------------------------------------------------------------------------ router

def old_heuristic(prompts: list[str]) -> np.ndarray:
    return np.array([complexity_score(p, tokens=count_tokens(p, "gpt-4o"))[0] for p in prompts])


def scores(scorer: Scorer, prompts: list[str]) -> np.ndarray:
    return np.array([scorer.score(p) for p in prompts])


def labels(bench: Bench, idx: np.ndarray) -> list[bool]:
    return [bool(x) for x in bench.failed[idx]]


Folds = list[tuple[np.ndarray, np.ndarray]]  # (test indices, scores of a scorer fitted elsewhere)


def kfold_fit(bench: Bench, prior: Scorer, repeats: int) -> Folds:
    """2 folds x ``repeats`` random splits by question: fit on one half, score the other."""
    folds: Folds = []
    groups = np.unique(bench.groups)
    for repeat in range(repeats):
        order = np.random.default_rng(repeat).permutation(groups)
        half = np.isin(bench.groups, order[: len(order) // 2])
        for train_mask in (half, ~half):
            fit_idx, test_idx = np.nonzero(train_mask)[0], np.nonzero(~train_mask)[0]
            fitted = prior.fit([bench.prompts[i] for i in fit_idx], labels(bench, fit_idx))
            folds.append((test_idx, scores(fitted, [bench.prompts[i] for i in test_idx])))
    return folds


def fold_metrics(bench: Bench, folds: Folds, reps: int) -> tuple[float, float, float, str]:
    """Mean APGR, CPT50, CPT80 over the folds, and the fold-averaged difference to longest
    first with its paired bootstrap interval (each replicate resamples inside every fold)."""
    length = np.array([len(p) for p in bench.prompts], float)
    values, c50, c80, diffs = [], [], [], []
    rng = np.random.default_rng(0)
    for idx, s in folds:
        qw, qs = bench.q_weak[idx], bench.q_strong[idx]
        values.append(apgr(s, qw, qs))
        c50.append(cpt(s, qw, qs, 0.5))
        c80.append(cpt(s, qw, qs, 0.8))
        diffs.append(values[-1] - apgr(length[idx], qw, qs))
    replicates = []
    for _ in range(reps):
        total = 0.0
        for idx, s in folds:
            pick = rng.integers(0, len(idx), len(idx))
            qw, qs = bench.q_weak[idx][pick], bench.q_strong[idx][pick]
            if (qs - qw).sum() == 0:
                continue
            total += apgr(s[pick], qw, qs) - apgr(length[idx][pick], qw, qs)
        replicates.append(total / len(folds))
    low, high = np.percentile(replicates, [2.5, 97.5])
    return (float(np.mean(values)), float(np.mean(c50)), float(np.mean(c80)),
            f"{np.mean(diffs):+.3f} [{low:+.3f}, {high:+.3f}]")


Row = tuple[str, "np.ndarray | None", "Folds | None"]


def router_rows(bench: Bench, other: Bench, repeats: int, say: Say) -> list[Row]:
    say(f"  {bench.name}: zero-shot scorer trained on {other.name} only")
    zero_shot = train([other])
    say(f"  {bench.name}: k-fold fit (2 folds x {repeats})")
    folds = kfold_fit(bench, zero_shot, repeats)
    length = np.array([len(p) for p in bench.prompts], float)
    return [("random (expected)", None, None),
            ("longest prompt first", length, None),
            ("old complexity_score heuristic", old_heuristic(bench.prompts), None),
            (f"shipped recipe, zero-shot (trained on {other.name})",
             scores(zero_shot, bench.prompts), None),
            (f"scorer after fit, 2-fold x {repeats} (mean of folds)", None, folds)]


def holdout_rows(bench: Bench, other: Bench) -> tuple[Bench, list[Row]]:
    mask = holdout_mask(bench)
    dev, hold = bench.take(np.nonzero(~mask)[0]), bench.take(np.nonzero(mask)[0])
    zero_shot = train([other])
    fitted = zero_shot.fit(dev.prompts, [bool(x) for x in dev.failed])
    length = np.array([len(p) for p in hold.prompts], float)
    return hold, [("random (expected)", None, None),
                  ("longest prompt first", length, None),
                  ("old complexity_score heuristic", old_heuristic(hold.prompts), None),
                  (f"shipped recipe, zero-shot (trained on {other.name})",
                   scores(zero_shot, hold.prompts), None),
                  (f"scorer after fit on the other half ({len(dev.prompts)})",
                   scores(fitted, hold.prompts), None)]


def router_table(title: str, bench: Bench, rows: list[Row], reps: int) -> str:
    lines = [f"\n{title}",
             "| policy | APGR | CPT(50%) | CPT(80%) | APGR - longest [95% CI] |",
             "|---|---:|---:|---:|---|"]
    length = next(s for name, s, _ in rows if name == "longest prompt first")
    assert length is not None
    for name, s, folds in rows:
        if folds is not None:
            value, c50, c80, diff = fold_metrics(bench, folds, reps)
        elif s is None:
            lines.append(f"| {name} | 0.500 | 50.0 % | 80.0 % | |")
            continue
        else:
            value = apgr(s, bench.q_weak, bench.q_strong)
            c50, c80 = (cpt(s, bench.q_weak, bench.q_strong, t) for t in (0.5, 0.8))
            diff = ""
            if name != "longest prompt first":
                d, low, high = bootstrap_diff(s, length, bench.q_weak, bench.q_strong, reps=reps)
                diff = f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"
        lines.append(f"| {name} | {value:.3f} | {c50:.1%} | {c80:.1%} | {diff} |"
                     .replace("%", " %"))
    return "\n".join(lines)


Stream = tuple[str, list[str], np.ndarray, "Bench | None"]  # name, prompts, order, outcomes


def streams(benches: list[Bench], chat: list[str]) -> list[Stream]:
    """Each prompt set in one fixed random order (a router's thresholds follow the order
    it sees prompts in); the chat questions have no outcomes."""
    sets: list[tuple[str, list[str], Bench | None]] = [(b.name, b.prompts, b) for b in benches]
    sets.append((f"chat questions ({len(chat)})", chat, None))
    found: list[Stream] = []
    for name, prompts, bench in sets:
        order = np.random.default_rng(7).permutation(len(prompts))
        found.append((name, [prompts[i] for i in order], order, bench))
    return found


def sent_up(router: Router, stream: list[str]) -> np.ndarray:
    return np.array([router.route(p).model == "gpt-4o" for p in stream])


def quality_cells(up: np.ndarray, bench: Bench | None, order: np.ndarray) -> list[str]:
    """Quality with these prompts sent up, and random routing's at the same share."""
    if bench is None:
        return ["", ""]
    qw, qs = bench.q_weak[order][-len(up):], bench.q_strong[order][-len(up):]
    return [f"{np.where(up, qs, qw).mean():.4g}",
            f"{qw.mean() + up.mean() * (qs.mean() - qw.mean()):.4g}"]


def default_threshold_table(benches: list[Bench], chat: list[str]) -> str:
    """A two-tier router as a newcomer builds it: the default rule fixed from the training
    prompts (``share_window=0``, the old behaviour) and following the app's recent prompts
    (the default: above their mean score), prompts in a fixed random order."""
    tiers = {"cheap": "gpt-4o-mini", "strong": "gpt-4o"}
    lines = ["\nDefault two-tier router (no thresholds or share given; prompts in a fixed "
             "random order)",
             "| set | fixed threshold 0.348: sent up | quality | random at that share | "
             "default (above the recent mean): sent up | quality | random at that share |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, stream, order, bench in streams(benches, chat):
        cells = [name]
        for router in (Router(tiers, share_window=0), Router(tiers)):
            up = sent_up(router, stream)
            cells += [f"{up.mean():.1%}".replace("%", " %"), *quality_cells(up, bench, order)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chat_questions() -> list[str]:
    """Short questions people ask a chat app: every distinct question of the cache pairs
    (benchmarks/data/cache-pairs; only their text is used here, never a label)."""
    import json
    folder = Path(__file__).resolve().parent / "data/cache-pairs"
    seen: dict[str, None] = {}
    for name in ("dev", "heldout", "test", "tuning"):  # the single-turn files of 12-06
        for line in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for key in ("a", "b"):
                if isinstance(row.get(key), str):
                    seen.setdefault(row[key], None)
    return list(seen)


def share_table(benches: list[Bench], chat: list[str]) -> str:
    """``strong_share=s``: the share actually sent up when the threshold is fixed from the
    training prompts' quantiles (the old rule) and when it follows the recent prompts."""
    tiers = {"cheap": "gpt-4o-mini", "strong": "gpt-4o"}
    lines = ["\nstrong_share: share of prompts actually sent up (prompts in a fixed random "
             "order; the router adapts after its first 100)",
             "| set | asked | fixed from training prompts | follows recent prompts, all | "
             "after warm-up | quality after warm-up | random at that share |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, stream, order, bench in streams(benches, chat):
        for share in (0.1, 0.3, 0.5):
            fixed_up = sent_up(Router(tiers, strong_share=share, share_window=0), stream)
            up = sent_up(Router(tiers, strong_share=share), stream)
            after = up[100:]
            quality, random = quality_cells(after, bench, order)
            lines.append(f"| {name} | {share:.0%} | {fixed_up.mean():.1%} | {up.mean():.1%} | "
                         f"{after.mean():.1%} | {quality} | {random} |".replace("%", " %"))
    return "\n".join(lines)


def route_latency(prompts: list[str]) -> str:
    router = Router({"cheap": "gpt-4o-mini", "strong": "gpt-4o"})
    router.route(prompts[0])
    timings = []
    for prompt in prompts:
        started = time.perf_counter()
        router.route(prompt)
        timings.append(time.perf_counter() - started)
    score_timings = []
    for prompt in prompts:
        started = time.perf_counter()
        router.scorer.score(prompt)
        score_timings.append(time.perf_counter() - started)
    return (f"\nroute() p50 {np.median(timings) * 1e3:.2f} ms, p99 "
            f"{np.quantile(timings, 0.99) * 1e3:.2f} ms (token count + scorer); scorer alone "
            f"p50 {np.median(score_timings) * 1e3:.3f} ms ({len(prompts)} GSM8K prompts)")


# ----------------------------------------------------------------------- GSM8K checks

_FINAL = r"####\s*\$?\s*(-?[\d,]*\.?\d+)"
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?%?"
# "12 * 3 = 36", "$5 + $7 + 8 = $20", and calculator annotations "<<12*3=36>>"
_EQUATION = re.compile(rf"((?:{_NUMBER}\s*[-+*/x×÷]\s*)+{_NUMBER})\s*=\s*({_NUMBER})")
_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")


def _number(text: str) -> float | None:
    try:
        return float(text.replace("$", "").replace(",", "").replace("%", "").strip())
    except ValueError:
        return None


def _evaluate(expression: str) -> float | None:
    expression = (expression.replace("$", "").replace(",", "").replace("%", "")
                  .replace("×", "*").replace("x", "*").replace("÷", "/"))
    if not re.fullmatch(r"[\d.\s+\-*/()]+", expression):
        return None
    try:
        return float(eval(expression, {"__builtins__": {}}, {}))  # digits and operators only
    except (SyntaxError, ZeroDivisionError, ValueError):
        return None


def _equations(text: str) -> list[tuple[float | None, float | None]]:
    found = [(_evaluate(m.group(1)), _number(m.group(2))) for m in _ANNOTATION.finditer(text)]
    stripped = _ANNOTATION.sub("", text)
    return found + [(_evaluate(m.group(1)), _number(m.group(2)))
                    for m in _EQUATION.finditer(stripped)]


def arithmetic_holds(text: str) -> str | None:
    """Every equation the answer writes down recomputes to the result it states."""
    for computed, stated in _equations(text):
        if computed is None or stated is None:
            continue
        if abs(computed - stated) > 1e-6 * max(1.0, abs(stated)) + 0.011:  # cents rounding
            return f"arithmetic error: computes {computed:g}, states {stated:g}"
    return None


def final_is_computed(text: str) -> str | None:
    """Self-consistency: the final answer is a number the worked solution produced."""
    final = re.search(_FINAL, text)
    if final is None:
        return "no final answer"
    value = _number(final.group(1))
    results = {stated for _, stated in _equations(text) if stated is not None}
    body = {_number(n) for n in re.findall(_NUMBER, text[:final.start()])}
    if value in results or (not results and value in body):
        return None
    return f"final answer {value:g} is not a result of the worked solution"


def cascade_table(gsm: Bench, say: Say) -> str:
    mask = holdout_mask(gsm)
    dev, hold = gsm.take(np.nonzero(~mask)[0]), gsm.take(np.nonzero(mask)[0])
    assert dev.weak_answers is not None and hold.weak_answers is not None
    say("  learned answer check: fit on the dev half, threshold chosen there (40 % escalated)")
    answer_texts = [f"{p}\n\n{a}" for p, a in zip(dev.prompts, dev.weak_answers)]
    # the prior is the shipped scorer; a weak pull (ANSWER_PRIOR pseudo-outcomes, chosen by
    # cross-validation on the dev half) lets the answer's own signals count
    learned = default_scorer().fit(answer_texts, [bool(x) for x in dev.failed],
                                   prior_strength=ANSWER_PRIOR, strong_share=0.40)
    final = MatchesRegex(_FINAL)
    learned_check = ScorerCheck(learned, on="both")
    combos: list[tuple[str, list[Callable[..., str | None]]]] = [
        ("final answer line", [final]),
        ("+ arithmetic verified", [final, arithmetic_holds]),
        ("+ self-consistent (the old README's cascade)", [final, arithmetic_holds,
                                                          final_is_computed]),
        ("learned answer check (ScorerCheck on prompt + answer)", [learned_check]),
        ("self-consistent + learned answer check", [final, arithmetic_holds,
                                                    final_is_computed, learned_check]),
    ]
    wrong = hold.failed
    lines = [f"\nGSM8K cascade checks on Mixtral's real answers, holdout half "
             f"({len(hold.prompts)} questions, {wrong.mean():.1%} of cheap answers wrong)",
             "| checks | false accepts | escalated | accuracy |", "|---|---:|---:|---:|"]
    for name, checks in combos:
        cascade = Cascade(["cheap", "strong"], checks)
        escalate = np.array([bool(cascade.evaluate(a, p))
                             for p, a in zip(hold.prompts, hold.weak_answers)])
        accepted = ~escalate
        false_accepts = (wrong & accepted).sum() / max(accepted.sum(), 1)
        accuracy = np.where(escalate, hold.q_strong, hold.q_weak).mean()
        lines.append(f"| {name} | {false_accepts:.1%} | {escalate.mean():.1%} | "
                     f"{accuracy:.2%} |".replace("%", " %"))
    perfect = np.where(wrong, hold.q_strong, hold.q_weak).mean()
    lines.append(f"| a perfect check (ceiling) | 0.0 % | {wrong.mean():.1%} | {perfect:.2%} |"
                 .replace("%", " %").replace("0.0  %", "0.0 %"))
    lines.append("Agreement (two cheap samples) and Verifier (a checking model) need model "
                 "calls this data does not have (one Mixtral answer per question): not measured.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=5, help="random 2-fold splits")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--quiet", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def say(line: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:5.1f} s] {line}", file=sys.stderr,
                  flush=True)

    say("loading GSM8K and MT-Bench")
    gsm, mt = load_gsm8k(args.data), load_mt_bench(args.data)
    out = []
    for bench, other in ((gsm, mt), (mt, gsm)):
        say(f"router table, {bench.name}, whole set")
        rows = router_rows(bench, other, args.repeats, say)
        say(f"  {bench.name}: bootstrap ({args.bootstrap} resamples per row)")
        out.append(router_table(f"{bench.name}, all {len(bench.prompts)} queries", bench, rows,
                                args.bootstrap))
        say(f"router table, {bench.name}, holdout half")
        hold, rows = holdout_rows(bench, other)
        out.append(router_table(f"{bench.name}, holdout half ({len(hold.prompts)} queries, "
                                "chose nothing)", hold, rows, args.bootstrap))
    say("default threshold")
    chat = chat_questions()
    out.append(default_threshold_table([gsm, mt], chat))
    say("strong_share: fixed vs following the recent prompts")
    out.append(share_table([gsm, mt], chat))
    say("route() latency")
    out.append(route_latency(gsm.prompts[:300]))
    say("cascade checks")
    out.append(cascade_table(gsm, say))
    out.append("\nFor reference (not comparable: other training data and protocol):\n"
               + "\n".join(f"- {line}" for line in PUBLISHED))
    print("\n".join(out))
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
