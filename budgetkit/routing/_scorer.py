"""The learned router scorer: P(the cheapest tier's answer is not acceptable | prompt).

A logistic model over :mod:`._features` (dense general signals + hashed word n-grams),
numpy only, a dot product per prompt. Plain arrays all the way down, so a scorer is one small
JSON document: the shipped default is package data (``data/router_scorer.json``, made by
``benchmarks/train_router.py``), a fitted one is a row of the store.

Why the shipped scorer ranks by length and little else: on the two benchmarks we can train
on (GSM8K, MT-Bench), every ranking learned on one ranked the other at or below random, and
length was the only signal that pointed the same way on both. So the shipped weights fix the
ranking to a length backbone and the data set only the probability scale; the rest is learned
from the user's own outcomes by :meth:`Scorer.fit`: a maximum-a-posteriori logistic
regression that starts at the shipped weights and is pulled back to them by an L2 prior
worth ``prior_strength`` pseudo-outcomes (so the pull fades as outcomes accumulate).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import numpy.typing as npt

from budgetkit.errors import ConfigurationError

from ._features import (DENSE_FEATURES, HASH_BITS, PromptFeatures, check_same_shape,
                        prompt_features)

__all__ = ["Scorer", "default_scorer", "FORMAT"]

FORMAT = "budgetkit-router-scorer/1"
Floats = npt.NDArray[np.float64]

#: Prior strength of a fit, in pseudo-outcomes (dense signals, hashed n-grams); chosen on the
#: dev halves of GSM8K and MT-Bench (benchmarks/train_router.py --search).
FIT_PRIOR_DENSE, FIT_PRIOR_HASHED = 1000.0, 10.0


@dataclass(frozen=True)
class Scorer:
    """Weights of the logistic scorer and the score distribution it was trained on.

    ``threshold`` is the documented default: a two-tier router routes up at or above it.
    ``quantiles`` (101 values, 0th..100th percentile) are the scores of the training
    prompts, so :meth:`threshold_for_share` can turn a target share into a threshold.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dense: tuple[float, ...]
    bias: float
    hashed: Mapping[int, float]
    threshold: float
    quantiles: tuple[float, ...]
    bits: int = HASH_BITS
    n_outcomes: int = 0
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = len(DENSE_FEATURES)
        if not (len(self.mean) == len(self.std) == len(self.dense) == d):
            raise ConfigurationError(f"a scorer needs {d} dense means, stds and weights")
        if any(s <= 0 for s in self.std):
            raise ConfigurationError("a scorer's dense stds must be > 0")
        if len(self.quantiles) != 101 or list(self.quantiles) != sorted(self.quantiles):
            raise ConfigurationError("a scorer needs 101 ascending score quantiles")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigurationError(f"scorer threshold must be within 0..1, got {self.threshold}")
        if any(not 0 <= i < (1 << self.bits) for i in self.hashed):
            raise ConfigurationError(f"hashed weight index out of range for {self.bits} bits")
        values = [*self.mean, *self.std, *self.dense, self.bias, *self.hashed.values()]
        if not all(math.isfinite(v) for v in values):
            raise ConfigurationError("a scorer's weights must be finite numbers")
        # Precomputed once: scoring is then a couple of small dot products.
        object.__setattr__(self, "_w", np.asarray(self.dense) / np.asarray(self.std))
        object.__setattr__(self, "_b", self.bias - float(
            np.dot(np.asarray(self.mean) / np.asarray(self.std), np.asarray(self.dense))))
        object.__setattr__(self, "_h", _dense_hash(self.hashed, self.bits))

    # -- scoring ------------------------------------------------------------------------
    def features(self, text: str) -> PromptFeatures:
        return prompt_features(text, bits=self.bits)

    def score(self, text: str) -> float:
        """P(cheapest tier's answer is not acceptable), in 0..1."""
        return self.score_features(self.features(text))

    def score_features(self, features: PromptFeatures) -> float:
        check_same_shape((features,), self.bits)
        h: Floats = self._h  # type: ignore[attr-defined]
        z = (float(np.dot(self._w, features.dense)) + self._b  # type: ignore[attr-defined]
             + sum(h[i] * v for i, v in zip(features.index, features.value)))
        return _sigmoid(z)

    def threshold_for_share(self, share: float) -> float:
        """The threshold sending about ``share`` of prompts like the training ones up."""
        if not 0.0 <= share <= 1.0:
            raise ConfigurationError(f"strong_share must be within 0..1, got {share}")
        if share <= 0.0:
            return 1.0
        return float(np.interp(1.0 - share, np.linspace(0, 1, 101), self.quantiles))

    # -- learning -----------------------------------------------------------------------
    def fit(self, prompts: Sequence[str], cheap_failed: Sequence[bool], *,
            prior_strength: tuple[float, float] = (FIT_PRIOR_DENSE, FIT_PRIOR_HASHED),
            strong_share: float | None = None) -> Scorer:
        """A new scorer adapted to these outcomes (``cheap_failed[i]``: the cheapest tier's
        answer to ``prompts[i]`` was not acceptable). See :meth:`fit_features`."""
        if isinstance(prompts, str) or len(prompts) != len(cheap_failed):
            raise ConfigurationError(
                "fit needs a list of prompts and a list of booleans of the same length")
        return self.fit_features([self.features(p) for p in prompts], cheap_failed,
                                 prior_strength=prior_strength, strong_share=strong_share)

    def fit_features(self, features: Sequence[PromptFeatures], cheap_failed: Sequence[bool], *,
                     prior_strength: tuple[float, float] = (FIT_PRIOR_DENSE, FIT_PRIOR_HASHED),
                     strong_share: float | None = None) -> Scorer:
        """Fit from stored features (no prompt text needed): MAP logistic regression,
        Newton-CG, warm-started at and pulled toward this scorer's weights.

        The new threshold is the outcomes' failure rate (the shipped rule: a prompt goes up
        when it looks harder than average), or, with ``strong_share``, the score that sends
        that share of the fitted prompts up.
        """
        if len(features) != len(cheap_failed) or not features:
            raise ConfigurationError(
                f"fit needs one or more outcomes, as many labels as prompts; got "
                f"{len(features)} prompts and {len(cheap_failed)} labels")
        if any(not isinstance(y, (bool, np.bool_)) for y in cheap_failed):
            raise ConfigurationError("cheap_failed must hold booleans (True = cheap answer failed)")
        lam_dense, lam_hashed = prior_strength
        if lam_dense <= 0 or lam_hashed <= 0:
            raise ConfigurationError(f"prior_strength must be > 0, got {prior_strength}")
        check_same_shape(features, self.bits)
        if strong_share is not None and not 0.0 <= strong_share <= 1.0:
            raise ConfigurationError(f"strong_share must be within 0..1, got {strong_share}")
        y = np.array([1.0 if v else 0.0 for v in cheap_failed])
        problem = _Problem.build(self, features)
        theta = _newton_cg(problem, y, lam_dense, lam_hashed)
        d = len(DENSE_FEATURES)
        new_dense = theta[:d]
        cols = problem.cols
        hashed = dict(self.hashed)
        for j, w in zip(cols.tolist(), theta[d:-1].tolist()):
            if w != 0.0:
                hashed[int(j)] = float(w)
        fitted = replace(self, dense=tuple(float(x) for x in new_dense), bias=float(theta[-1]),
                         hashed=hashed, n_outcomes=self.n_outcomes + len(features),
                         info={**self.info, "fitted_on": len(features)})
        scores = np.array([fitted.score_features(f) for f in features])
        quantiles = tuple(float(q) for q in np.quantile(scores, np.linspace(0, 1, 101)))
        fitted = replace(fitted, quantiles=quantiles, threshold=float(y.mean()))
        if strong_share is None:
            return fitted
        return replace(fitted, threshold=min(1.0, fitted.threshold_for_share(strong_share)))

    def _default_share(self) -> float:
        below = float(np.interp(self.threshold, self.quantiles, np.linspace(0, 1, 101)))
        return min(1.0, max(0.0, 1.0 - below))

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        keys = sorted(self.hashed)
        return {"format": FORMAT, "features": list(DENSE_FEATURES), "hash_bits": self.bits,
                "mean": list(self.mean), "std": list(self.std), "dense": list(self.dense),
                "bias": self.bias, "hashed_index": keys,
                "hashed_weight": [round(self.hashed[k], 7) for k in keys],
                "threshold": self.threshold, "quantiles": list(self.quantiles),
                "n_outcomes": self.n_outcomes, "info": dict(self.info)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scorer:
        if data.get("format") != FORMAT:
            raise ConfigurationError(
                f"not a router scorer of format {FORMAT!r}: got {data.get('format')!r}")
        if list(data.get("features", ())) != list(DENSE_FEATURES):
            raise ConfigurationError("router scorer was made for other dense features")
        try:
            hashed = {int(i): float(w) for i, w in
                      zip(data["hashed_index"], data["hashed_weight"], strict=True)}
            return cls(mean=tuple(map(float, data["mean"])), std=tuple(map(float, data["std"])),
                       dense=tuple(map(float, data["dense"])), bias=float(data["bias"]),
                       hashed=hashed, threshold=float(data["threshold"]),
                       quantiles=tuple(map(float, data["quantiles"])),
                       bits=int(data["hash_bits"]), n_outcomes=int(data.get("n_outcomes", 0)),
                       info=dict(data.get("info") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"malformed router scorer: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> Scorer:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"router scorer is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigurationError("router scorer JSON must be an object")
        return cls.from_dict(data)


@lru_cache(maxsize=1)
def default_scorer() -> Scorer:
    """The shipped scorer (package data, validated on first use)."""
    text = resources.files("budgetkit.routing").joinpath("data/router_scorer.json").read_text(
        encoding="utf-8")
    return Scorer.from_json(text)


# ------------------------------------------------------------------------------ solver

def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _dense_hash(hashed: Mapping[int, float], bits: int) -> Floats:
    h = np.zeros(1 << bits)
    if hashed:
        h[np.fromiter(hashed.keys(), np.int64)] = np.fromiter(hashed.values(), np.float64)
    return h


@dataclass
class _Problem:
    """The fit's design: standardised dense matrix, hashed nonzeros remapped to the
    columns that occur (so the solver never touches the 2^bits empty ones), prior values."""

    Z: Floats
    rows: npt.NDArray[np.int64]
    cols_local: npt.NDArray[np.int64]
    vals: Floats
    cols: npt.NDArray[np.int64]
    prior: Floats

    @classmethod
    def build(cls, scorer: Scorer, features: Sequence[PromptFeatures]) -> _Problem:
        mean, std = np.asarray(scorer.mean), np.asarray(scorer.std)
        Z = (np.array([f.dense for f in features], dtype=np.float64) - mean) / std
        rows = np.concatenate([np.full(len(f.index), r, np.int64)
                               for r, f in enumerate(features)] + [np.zeros(0, np.int64)])
        raw = np.concatenate([np.asarray(f.index, np.int64) for f in features]
                             + [np.zeros(0, np.int64)])
        vals = np.concatenate([np.asarray(f.value, np.float64) for f in features]
                              + [np.zeros(0)])
        cols, cols_local = np.unique(raw, return_inverse=True)
        h = _dense_hash(scorer.hashed, scorer.bits)
        prior = np.concatenate([np.asarray(scorer.dense), h[cols], [scorer.bias]])
        return cls(Z, rows, cols_local.astype(np.int64), vals, cols, prior)


def _newton_cg(p: _Problem, y: Floats, lam_dense: float, lam_hashed: float,
               iterations: int = 30) -> Floats:
    """argmin sum log-loss + lam/2 ||theta - prior||^2 (bias unpenalised but for 1e-6)."""
    n, d = p.Z.shape
    k = len(p.cols)
    lam = np.concatenate([np.full(d, lam_dense), np.full(k, lam_hashed), [1e-6]])

    def margin(t: Floats) -> Floats:
        return _times(p, t, n, d, k)

    def back(r: Floats) -> Floats:
        return np.concatenate([p.Z.T @ r, np.bincount(p.cols_local, weights=p.vals * r[p.rows],
                                                      minlength=k), [r.sum()]])

    def loss(t: Floats) -> float:
        m = margin(t)
        return float(np.sum(np.logaddexp(0.0, m) - y * m)
                     + 0.5 * np.sum(lam * (t - p.prior) ** 2))

    theta: Floats = p.prior.copy()
    f = loss(theta)
    for _ in range(iterations):
        prob = 0.5 * (1.0 + np.tanh(0.5 * margin(theta)))
        g = back(prob - y) + lam * (theta - p.prior)
        gnorm = float(np.linalg.norm(g))
        if gnorm < 1e-8 * n:
            break
        s = prob * (1.0 - prob)
        step = np.zeros_like(theta)
        r = -g
        q = r.copy()
        rr = float(r @ r)
        for _ in range(50):  # conjugate gradient on the Newton system
            hq = back(s * _times(p, q, n, d, k)) + lam * q
            alpha = rr / float(q @ hq)
            step += alpha * q
            r -= alpha * hq
            rr_new = float(r @ r)
            if math.sqrt(rr_new) < 0.1 * gnorm * min(1.0, gnorm):
                break
            q = r + (rr_new / rr) * q
            rr = rr_new
        t = 1.0
        while t > 1e-4:  # backtracking keeps every step a descent step
            candidate: Floats = theta + t * step
            fc = loss(candidate)
            if fc <= f + 1e-4 * t * float(g @ step):
                break
            t *= 0.5
        else:
            break
        converged = abs(f - fc) < 1e-10 * max(1.0, abs(f))
        theta, f = candidate, fc
        if converged:
            break
    return theta


def _times(p: _Problem, v: Floats, n: int, d: int, k: int) -> Floats:
    """The design matrix (dense, hashed, intercept column of ones) times ``v``."""
    hashed = np.bincount(p.rows, weights=p.vals * v[d:d + k][p.cols_local], minlength=n)
    product: Floats = p.Z @ v[:d] + hashed + v[-1]
    return product
