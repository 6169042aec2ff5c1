"""Shared by train_router.py and bench_routing.py: RouteLLM's outcome data, the holdout
split, and the routing metrics (APGR, CPT, paired bootstrap).

Data: ``../shared/data/routing-eval`` relative to the repository (override with ``--data``),
copied unchanged from the RouteLLM repository (lm-sys/RouteLLM, commit 0b64fdaf,
Apache-2.0, licence alongside). Strong model gpt-4-1106-preview, weak (cheap) model
Mixtral-8x7B-Instruct-v0.1. Contaminated prompts listed beside the data are dropped.
"""

from __future__ import annotations

import csv
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/routing-eval"
CSV_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
CSV_STRONG = "gpt-4-1106-preview"


@dataclass
class Bench:
    """One benchmark's queries with both models' quality and the cheap-failed label."""

    name: str
    prompts: list[str]
    q_weak: np.ndarray
    q_strong: np.ndarray
    failed: np.ndarray      # the cheap model's answer was not acceptable
    groups: np.ndarray      # question id: both MT-Bench turns of a question split together
    weak_answers: list[str] | None = None
    strong_answers: list[str] | None = None

    def take(self, idx: np.ndarray) -> Bench:
        pick = [int(i) for i in idx]
        return Bench(self.name, [self.prompts[i] for i in pick], self.q_weak[idx],
                     self.q_strong[idx], self.failed[idx], self.groups[idx],
                     None if self.weak_answers is None else [self.weak_answers[i] for i in pick],
                     None if self.strong_answers is None
                     else [self.strong_answers[i] for i in pick])


def load_gsm8k(data: Path = DEFAULT_DATA) -> Bench:
    """1,307 GSM8K questions (1,319 less 12 contaminated); label: Mixtral's answer wrong."""
    csv.field_size_limit(1 << 30)
    contaminated = {json.loads(line)["eval_prompt"].strip()
                    for line in (data / "gsm8k/contaminated_prompts.jsonl").open()}
    prompts, qw, qs, weak, strong = [], [], [], [], []
    with (data / "gsm8k/gsm8k_responses.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["prompt"].strip() in contaminated:
                continue
            prompts.append(row["prompt"])
            qw.append(float(row[CSV_WEAK] == "True"))
            qs.append(float(row[CSV_STRONG] == "True"))
            weak.append(row[f"{CSV_WEAK}_response"])
            strong.append(row[f"{CSV_STRONG}_response"])
    q_weak, q_strong = np.array(qw), np.array(qs)
    groups = np.array([zlib.crc32(p.encode()) for p in prompts], np.int64)
    return Bench("GSM8K", prompts, q_weak, q_strong, q_weak < 1, groups, weak, strong)


def load_mt_bench(data: Path = DEFAULT_DATA) -> Bench:
    """144 MT-Bench queries (72 uncontaminated questions x 2 turns; the prompt of turn 2 is
    both user turns); quality = GPT-4 judge score 1-10; label: Mixtral scored below GPT-4."""
    contaminated = {json.loads(line)["eval_prompt"].strip()
                    for line in (data / "mt_bench/contaminated_prompts.jsonl").open()}
    questions = {q["question_id"]: q for q in
                 map(json.loads, (data / "mt_bench/question.jsonl").open())
                 if q["turns"][0].strip() not in contaminated}
    scores: dict[tuple[int, int, str], float] = {}
    for judgement in map(json.loads, (data / "mt_bench/judgements.jsonl").open()):
        model = "strong" if judgement["model"] == CSV_STRONG else "weak"
        scores[(judgement["question_id"], judgement["turn"], model)] = float(judgement["score"])
    prompts, qw, qs, groups = [], [], [], []
    for qid, question in sorted(questions.items()):
        for turn in (1, 2):
            if (qid, turn, "weak") not in scores or (qid, turn, "strong") not in scores:
                continue
            prompts.append("\n\n".join(question["turns"][:turn]))
            qw.append(scores[(qid, turn, "weak")])
            qs.append(scores[(qid, turn, "strong")])
            groups.append(qid)
    q_weak, q_strong = np.array(qw), np.array(qs)
    return Bench("MT-Bench", prompts, q_weak, q_strong, q_weak < q_strong,
                 np.array(groups, np.int64))


def holdout_mask(bench: Bench) -> np.ndarray:
    """The half of each benchmark that chose nothing (by question: crc32 of its id)."""
    return np.array([zlib.crc32(f"holdout:{g}".encode()) % 1000 < 500 for g in bench.groups])


# ----------------------------------------------------------------------------- metrics

def pgr_curve(scores: np.ndarray, q_weak: np.ndarray, q_strong: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """(strong-call share, performance gap recovered) at each change of score, highest
    scores sent to the strong model first; ties are broken at random (expected value:
    linear between the ends of a tie)."""
    n = len(scores)
    gain = q_strong - q_weak
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    bounds = np.concatenate([[0], np.nonzero(np.diff(ranked))[0] + 1, [n]])
    cumulative = np.concatenate([[0.0], np.cumsum(gain[order])])
    return bounds / n, cumulative[bounds] / gain.sum()


def apgr(scores: np.ndarray, q_weak: np.ndarray, q_strong: np.ndarray) -> float:
    """Average performance gap recovered: area under the PGR-vs-strong-share curve
    (random routing 0.5, a perfect ranking close to 1)."""
    xs, ys = pgr_curve(np.asarray(scores, float), q_weak, q_strong)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def cpt(scores: np.ndarray, q_weak: np.ndarray, q_strong: np.ndarray, target: float) -> float:
    """Call-performance threshold: the smallest strong-call share recovering ``target`` of
    the gap (random routing: ``target`` itself)."""
    xs, ys = pgr_curve(np.asarray(scores, float), q_weak, q_strong)
    for i in range(1, len(xs)):
        if ys[i] >= target:
            y0, y1 = ys[i - 1], ys[i]
            if y1 == y0:
                return float(xs[i])
            return float(xs[i - 1] + (target - y0) / (y1 - y0) * (xs[i] - xs[i - 1]))
    return 1.0


def bootstrap_diff(a: np.ndarray, b: np.ndarray, q_weak: np.ndarray, q_strong: np.ndarray,
                   reps: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """APGR(a) - APGR(b) on the data and its 95 % paired bootstrap interval."""
    rng = np.random.default_rng(seed)
    n = len(a)
    diffs = []
    for _ in range(reps):
        i = rng.integers(0, n, n)
        if (q_strong[i] - q_weak[i]).sum() == 0:
            continue
        diffs.append(apgr(a[i], q_weak[i], q_strong[i]) - apgr(b[i], q_weak[i], q_strong[i]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return apgr(a, q_weak, q_strong) - apgr(b, q_weak, q_strong), float(low), float(high)
