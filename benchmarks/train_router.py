"""Reproduce the shipped router scorer (budgetkit/routing/data/router_scorer.json).

Data: RouteLLM's GSM8K and MT-Bench outcomes in ``../shared/data/routing-eval`` (Apache-2.0;
see benchmarks/routing_data.py). Label: the cheap model's (Mixtral-8x7B) answer was not
acceptable: wrong on GSM8K, judged below GPT-4's answer on MT-Bench.

Recipe (chosen on the dev halves, see docs/routing.md):

* the *ranking* is fixed to a length backbone, log(chars) + log(words) + a code marker:
  on these two benchmarks a ranking learned on one ranked the other at or below random, and
  length was the only signal that pointed the same way on both;
* the *probability scale* (intercept and slope, slope floored at 0.05 so the ranking cannot
  vanish) comes from a one-feature logistic regression on both benchmarks pooled, each
  weighing half;
* the default threshold is the pooled failure rate of the cheap model (each benchmark weighing
  half, 0.348): a prompt goes up when its estimated failure probability is above the average
  one. About half of the benchmark prompts go up, fewer of short chat prompts, more of long
  ones; set ``strong_share`` or ``calibrate`` for a fixed share of your own traffic.

Deterministic: same data, same file (byte for byte).

Run:  python benchmarks/train_router.py [--data ../shared/data/routing-eval] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from budgetkit.routing import Scorer
from budgetkit.routing._features import DENSE_FEATURES, prompt_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_data import DEFAULT_DATA, Bench, load_gsm8k, load_mt_bench  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "budgetkit/routing/data/router_scorer.json"
BACKBONE = {"log_chars": 1.0, "log_words": 1.0, "code": 1.0}
MIN_SLOPE = 0.05


def weighted_quantiles(values: np.ndarray, weights: np.ndarray) -> tuple[float, ...]:
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cdf = (np.cumsum(w) - 0.5 * w) / w.sum()
    return tuple(float(x) for x in np.interp(np.linspace(0, 1, 101), cdf, v))


def train(benches: list[Bench]) -> Scorer:
    """The shipped recipe on these benchmarks (each weighs the same in total)."""
    prompts = [p for b in benches for p in b.prompts]
    y = np.concatenate([b.failed for b in benches]).astype(float)
    weights = np.concatenate([np.full(len(b.prompts), 1.0 / len(b.prompts)) for b in benches])
    weights /= weights.sum()
    X = np.array([prompt_features(p).dense for p in prompts])
    mean = X.mean(0)
    std = np.where(X.std(0) < 1e-9, 1.0, X.std(0))
    columns = [DENSE_FEATURES.index(name) for name in BACKBONE]
    x = X[:, columns] @ np.array(list(BACKBONE.values()))
    centre = float(np.average(x, weights=weights))
    xc = x - centre
    a = b = 0.0
    for _ in range(100):  # Newton on (intercept, slope); tiny ridge keeps it well posed
        p = 1.0 / (1.0 + np.exp(-(a + b * xc)))
        r, s = weights * (p - y), weights * p * (1 - p)
        g = np.array([r.sum(), (r * xc).sum() + 1e-4 * b])
        H = np.array([[s.sum(), (s * xc).sum()], [(s * xc).sum(), (s * xc * xc).sum() + 1e-4]])
        a, b = np.array([a, b]) - np.linalg.solve(H, g)
    if b < MIN_SLOPE:  # the ranking must stay length-monotone: floor the slope, refit a
        b = MIN_SLOPE
        for _ in range(100):
            p = 1.0 / (1.0 + np.exp(-(a + b * xc)))
            a -= float((weights * (p - y)).sum() / (weights * p * (1 - p)).sum())
    dense = np.zeros(len(DENSE_FEATURES))
    for name, c in BACKBONE.items():
        i = DENSE_FEATURES.index(name)
        dense[i] = b * c * std[i]  # weights live in standardised units
    bias = float(a - b * centre + sum(b * c * mean[DENSE_FEATURES.index(n)]
                                      for n, c in BACKBONE.items()))
    scores = 1.0 / (1.0 + np.exp(-(a + b * xc)))
    quantiles = weighted_quantiles(scores, weights)
    provisional = Scorer(mean=tuple(map(float, mean)), std=tuple(map(float, std)),
                         dense=tuple(map(float, dense)), bias=bias, hashed={}, threshold=0.5,
                         quantiles=quantiles,
                         info={"trained_on": [f"{bench.name} ({len(bench.prompts)})"
                                              for bench in benches],
                               "recipe": "length backbone log(chars)+log(words)+code; "
                                         "logistic scale; threshold = pooled failure rate",
                               "slope": round(float(b), 6)})
    base_rate = float(np.average(y, weights=weights))
    return Scorer.from_dict({**provisional.to_dict(), "threshold": round(base_rate, 6)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    scorer = train([load_gsm8k(args.data), load_mt_bench(args.data)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(scorer.to_json() + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): slope "
          f"{scorer.info['slope']}, threshold {scorer.threshold:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
