"""Thresholds that send a target share of *this app's* prompts up, whatever they look like.

A share turned into a threshold once, from the scorer's training prompts, holds only for
traffic that looks like those prompts. Measured on the two benchmarks the shipped scorer
knows: ``strong_share=0.1`` sent 1.9 % of GSM8K prompts up and 18.1 % of MT-Bench's; short chat
questions, shorter than both, go up even less. So a router asked for a share keeps the scores
of the last ``window`` prompts it scored and takes its thresholds from their quantiles, once
it has seen ``warmup`` of them (before that, from the training quantiles).

Per process and in memory: processes behind one load balancer see the same mix of prompts,
so their windows agree without sharing state, and a restart re-learns the mix within
``warmup`` prompts. Scores of a different scorer are not comparable, so a new scorer starts
a new window.
"""

from __future__ import annotations

import threading

import numpy as np

from budgetkit.errors import ConfigurationError

__all__ = ["ShareTracker"]

#: Thresholds are recomputed after this many new scores, not on every route(): a quantile
#: of 1,000 floats costs about 20 µs, a route() about 250 µs.
_RECOMPUTE_EVERY = 16


class ShareTracker:
    """The recent scores of one router and the thresholds that split them by share.

    ``thresholds(fallback)`` returns ``(medium, high)``: the score at or above which about
    ``high_share`` of the last ``window`` prompts lie, and the one for ``high_share +
    medium_share``; ``fallback`` (the training-quantile thresholds) until ``warmup`` scores
    have been seen. Thread-safe.
    """

    def __init__(self, high_share: float, medium_share: float, *, window: int = 1000,
                 warmup: int = 100) -> None:
        if not (isinstance(window, int) and window >= 1):
            raise ConfigurationError(f"share_window must be an int >= 1, got {window!r}")
        if not (isinstance(warmup, int) and 1 <= warmup <= window):
            raise ConfigurationError(
                f"share_warmup must be an int within 1..share_window ({window}), got {warmup!r}")
        self.high_share, self.medium_share = high_share, medium_share
        self.window, self.warmup = window, warmup
        self._scores = np.empty(window)
        self._seen = 0
        self._since_recompute = 0
        self._cached: tuple[float, float] | None = None
        self._lock = threading.Lock()

    @property
    def seen(self) -> int:
        """Scores observed since the window was (re)started."""
        return self._seen

    @property
    def adapted(self) -> bool:
        """Whether the thresholds now come from this app's own prompts."""
        return self._seen >= self.warmup

    def observe(self, score: float) -> None:
        with self._lock:
            self._scores[self._seen % self.window] = score
            self._seen += 1
            self._since_recompute += 1

    def reset(self) -> None:
        """Start a new window (after a scorer change: old scores are not comparable)."""
        with self._lock:
            self._seen = 0
            self._since_recompute = 0
            self._cached = None

    def thresholds(self, fallback: tuple[float, float]) -> tuple[float, float]:
        with self._lock:
            if self._seen < self.warmup:
                return fallback
            if self._cached is None or self._since_recompute >= _RECOMPUTE_EVERY:
                recent = self._scores[:min(self._seen, self.window)]
                high = _at_or_above(recent, self.high_share)
                medium = _at_or_above(recent, min(1.0, self.high_share + self.medium_share))
                self._cached = (min(medium, high), high)
                self._since_recompute = 0
            return self._cached


def _at_or_above(scores: np.ndarray, share: float) -> float:
    """The threshold sending the number of ``scores`` at or above it closest to ``share`` of
    them. Equal scores go the same way, so a tie at the cut is kept whole or left out,
    whichever lands nearer the share."""
    if share <= 0.0:
        return min(1.0, float(np.nextafter(scores.max(), np.inf)))
    if share >= 1.0:
        return 0.0
    ordered = np.sort(scores)[::-1]
    wanted = share * len(ordered)
    cut = float(ordered[max(0, int(round(wanted)) - 1)])
    just_above = min(1.0, float(np.nextafter(cut, np.inf)))
    with_tie, without_tie = int(np.sum(ordered >= cut)), int(np.sum(ordered > cut))
    return cut if abs(with_tie - wanted) <= abs(without_tie - wanted) else just_above
