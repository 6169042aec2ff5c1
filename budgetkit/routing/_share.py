"""Thresholds taken from *this app's* recent prompts, so they hold whatever the prompts look like.

A threshold fixed from the scorer's training prompts holds only for traffic that looks like
them. Measured: ``strong_share=0.1`` turned into a fixed threshold sent 1.9 % of GSM8K prompts
up and 18.1 % of MT-Bench's, and the shipped default threshold (the training prompts' average
risk) sent 0 % of short chat questions up: a router that never routes up saves nothing and
only looks like it does. So a router keeps the scores of the last ``window`` prompts it
scored and, once it has seen ``warmup`` of them (before that, the training prompts decide),
sends up either a share of them (``strong_share``) or, by default, those scoring above their
mean: the prompts that look harder than this app's average prompt.

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
    """The recent scores of one router and the thresholds that split them.

    ``thresholds(fallback)`` returns ``(medium, high)`` over the last ``window`` scores:
    ``high`` is the score at or above which about ``high_share`` of them lie (with
    ``high_share=None``: their mean), ``medium`` the one for ``medium_share`` more;
    ``fallback`` (the thresholds from the training prompts) until ``warmup`` scores have been
    seen. Thread-safe.
    """

    def __init__(self, high_share: float | None, medium_share: float, *, window: int = 1000,
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

    @classmethod
    def for_router(cls, strong_share: float | None, medium_share: float, *, window: int,
                   warmup: int, fixed: bool) -> ShareTracker | None:
        """The tracker a router's settings call for; None when its thresholds stay fixed
        (explicit thresholds, or ``share_window=0``)."""
        if not (isinstance(window, int) and window >= 0):
            raise ConfigurationError(f"share_window must be an int >= 0, got {window!r}")
        if fixed or window == 0:
            return None
        return cls(None if strong_share is None else float(strong_share), float(medium_share),
                   window=window, warmup=warmup)

    @property
    def seen(self) -> int:
        """Scores observed since the window was (re)started."""
        return self._seen

    @property
    def adapted(self) -> bool:
        """Whether the thresholds now come from this app's own prompts."""
        return self._seen >= self.warmup

    def source(self) -> str:
        """Where the thresholds come from now, for a decision's reason."""
        if self._seen < self.warmup:
            return f"from the training prompts, warm-up {self._seen}/{self.warmup}"
        return f"from the last {min(self._seen, self.window)} prompts"

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
                if self.high_share is None:
                    # strictly above the mean: of equal scores, none looks harder
                    high = min(1.0, float(np.nextafter(recent.mean(), np.inf)))
                    high_share = float(np.mean(recent >= high))
                else:
                    high, high_share = _at_or_above(recent, self.high_share), self.high_share
                medium = _at_or_above(recent, min(1.0, high_share + self.medium_share))
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
