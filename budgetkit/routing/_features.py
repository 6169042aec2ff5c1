"""What the learned router scorer sees of a prompt: general signals and hashed word n-grams.

Two kinds of features, both cheap (about 0.2 ms for a GSM8K-sized prompt):

* 15 *dense* general signals (length in characters and words, digits, question marks, code,
  maths, lines, sentences, list items, reasoning cues, constraints, ...). Length is the only
  one that ranked prompts the same way on both benchmarks we have, so the shipped scorer
  ranks by it; the others are there for :meth:`Scorer.fit` to weigh on the user's traffic.
* *hashed* word uni- and bi-grams: ``zlib.crc32`` of the n-gram (stable across processes
  and Python versions, unlike the salted ``hash()``), the low ``bits`` bits pick the bucket
  and the top bit the sign, so two n-grams sharing a bucket tend to cancel rather than add.
  Numbers become ``<nK>`` (K = digit count up to 4) so "12 apples" and "37 apples" share
  features. The vector is L2-normalised: length is the dense features' business.

:class:`PromptFeatures` is what a cascade verdict stores instead of the prompt text.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from budgetkit.errors import ConfigurationError

__all__ = ["DENSE_FEATURES", "HASH_BITS", "PromptFeatures", "prompt_features"]

HASH_BITS = 14

DENSE_FEATURES: tuple[str, ...] = (
    "log_chars", "log_words", "digit_share", "log_numbers", "log_questions", "code",
    "math_share", "log_lines", "upper_share", "mean_word_len", "log_sentences",
    "log_list_items", "log_cues", "log_constraints", "nonascii_share",
)

_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
_CODE = re.compile(
    r"```|^\s*(?:def|class|import|from \S+ import|function|const|let|var|public|private|"
    r"#include|SELECT|CREATE TABLE)\b|[;{}]\s*$|=>|\w+\([^()]*\)\s*[{:]",
    re.MULTILINE | re.IGNORECASE)
_CUES = re.compile(
    r"\b(?:why|prove|proof|derive|step[- ]by[- ]step|reason(?:ing)?|explain|analy[sz]e|"
    r"compare|trade-?offs?|evaluate|justify|design|architect\w*|optimi[sz]e|debug|"
    r"calculate|estimate|implications?|pros and cons|critique|plan)\b", re.IGNORECASE)
_CONSTRAINTS = re.compile(
    r"\b(?:must|should|shall|at least|at most|no more than|exactly|without|only|never|"
    r"always|ensure|required?|limit(?:ed)? to)\b|^\s*(?:[-*•]|\d+[.)])\s+",
    re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_MATH = re.compile(r"[=+*/^<>%]|\\[a-z]+|\bsqrt\b|\bsum\b|\bintegral\b|\bprobability\b",
                   re.IGNORECASE)
_SENTENCE = re.compile(r"[.!?](?:\s|$)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)]|[A-Da-d][.)])\s+", re.MULTILINE)


@dataclass(frozen=True)
class PromptFeatures:
    """A prompt as the scorer sees it; enough to score or to learn, without the text."""

    dense: tuple[float, ...]
    index: tuple[int, ...]
    value: tuple[float, ...]
    bits: int = HASH_BITS

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON-able form (what a cascade verdict stores in the ledger)."""
        return {"d": [round(x, 6) for x in self.dense], "i": list(self.index),
                "v": [round(x, 6) for x in self.value], "b": self.bits}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptFeatures:
        try:
            dense = tuple(float(x) for x in data["d"])
            index = tuple(int(i) for i in data["i"])
            value = tuple(float(v) for v in data["v"])
            bits = int(data.get("b", HASH_BITS))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"malformed prompt features {dict(data)!r}: {exc}") from None
        if len(dense) != len(DENSE_FEATURES) or len(index) != len(value):
            raise ConfigurationError(
                f"prompt features need {len(DENSE_FEATURES)} dense values and as many hashed "
                f"values as indices, got {len(dense)} and {len(value)}/{len(index)}")
        if any(not 0 <= i < (1 << bits) for i in index):
            raise ConfigurationError(f"hashed feature index out of range for {bits} bits")
        return cls(dense, index, value, bits)


def _dense(text: str) -> tuple[float, ...]:
    chars = len(text)
    n = max(chars, 1)
    words = text.split()
    return (
        math.log1p(chars),
        math.log1p(len(words)),
        sum(c.isdigit() for c in text) / n,
        math.log1p(len(_NUMBER.findall(text))),
        math.log1p(text.count("?")),
        1.0 if _CODE.search(text) else 0.0,
        len(_MATH.findall(text)) / n * 10.0,
        math.log1p(text.count("\n")),
        sum(c.isupper() for c in text) / n,
        (sum(len(w) for w in words) / len(words)) if words else 0.0,
        math.log1p(len(_SENTENCE.findall(text))),
        math.log1p(len(_LIST_ITEM.findall(text))),
        math.log1p(len(_CUES.findall(text))),
        math.log1p(len(_CONSTRAINTS.findall(text))),
        sum(ord(c) > 127 for c in text) / n,
    )


def _hashed(text: str, bits: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    tokens = [f"<n{min(len(t), 4)}>" if t[0].isdigit() else t
              for t in _TOKEN.findall(text.lower())]
    grams = set(tokens)
    grams.update(f"{a} {b}" for a, b in zip(tokens, tokens[1:]))
    mask = (1 << bits) - 1
    buckets: dict[int, float] = {}
    for gram in grams:
        h = zlib.crc32(gram.encode("utf-8"))
        buckets[h & mask] = buckets.get(h & mask, 0.0) + (1.0 if h >> 31 else -1.0)
    kept = sorted((i, v) for i, v in buckets.items() if v != 0.0)
    norm = math.sqrt(sum(v * v for _, v in kept)) or 1.0
    return tuple(i for i, _ in kept), tuple(v / norm for _, v in kept)


def prompt_features(text: str, *, bits: int = HASH_BITS) -> PromptFeatures:
    """The features of one prompt (pure, deterministic across processes)."""
    if not isinstance(text, str):
        raise ConfigurationError(f"a prompt must be a str, got {type(text).__name__}")
    if not 8 <= bits <= 24:
        raise ConfigurationError(f"hash bits must be within 8..24, got {bits}")
    index, value = _hashed(text, bits)
    return PromptFeatures(_dense(text), index, value, bits)


def check_same_shape(features: Sequence[PromptFeatures], bits: int) -> None:
    """Refuse features hashed into another space than the scorer's (they would not mean
    the same buckets)."""
    for f in features:
        if f.bits != bits:
            raise ConfigurationError(
                f"prompt features hashed with {f.bits} bits cannot train a {bits}-bit scorer")
