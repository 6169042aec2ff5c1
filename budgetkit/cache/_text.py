"""Words of a question, as the second stage compares them, and what it knows about words.

Everything here is about *form*: case, spacing, contractions, texting spellings ("u", "pls",
"how 2 make"), typos, and the few word relations the verifier needs. Relations come from
``data/lexicon.json.gz``, built by ``benchmarks/data/build_cache_lexicon.py`` from WordNet
3.0 (Princeton, WordNet licence; Debian package ``wordnet-base``), restricted to the 21.7k
whole words of the MiniLM (bert-base-uncased) vocabulary:

* synonym sets (two words share one: "sofa" / "couch"),
* antonym pairs ("increase" / "decrease", "possible" / "impossible"),
* parts of speech (is a one-sided word an adjective that narrows the question?),
* the vocabulary itself, in the tokenizer's order (a word outside it may be a typo).

No rule here names a topic: the verifier has to hold on questions nobody has seen yet.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from budgetkit.errors import ConfigurationError

from . import _guard

__all__ = ["Lexicon", "lexicon", "tokens", "embedding_text", "lemma", "is_typo",
           "are_synonyms", "are_opposites", "known"]

_LEXICON_FILE = Path(__file__).parent / "data" / "lexicon.json.gz"

_CONTRACTIONS = (
    (r"\bwhat's\b", "what is"), (r"\bwhats\b", "what is"), (r"\bcan't\b", "can not"),
    (r"\bcannot\b", "can not"), (r"\bwon't\b", "will not"), (r"n't\b", " not"),
    (r"'re\b", " are"), (r"'ve\b", " have"), (r"'ll\b", " will"), (r"'d\b", " would"),
    (r"\bi'm\b", "i am"), (r"\b(how|where|who|it|that|there)'s\b", r"\1 is"))

#: Texting spellings: a closed class of the written language, not a list of topics.
_INFORMAL = {
    "u": "you", "ur": "your", "r": "are", "y": "why", "pls": "please", "plz": "please",
    "thx": "thanks", "wat": "what", "cud": "could", "wud": "would", "shud": "should",
    "b4": "before", "gr8": "great", "msg": "message", "info": "information",
    "docs": "documents", "pw": "password", "pwd": "password", "abt": "about",
    "bc": "because", "cuz": "because", "ppl": "people", "govt": "government",
    "tmrw": "tomorrow", "tmr": "tomorrow", "wanna": "want to", "gonna": "going to",
    "gotta": "have to", "dont": "do not", "cant": "can not", "wont": "will not",
    "im": "i am", "ive": "i have", "doesnt": "does not", "isnt": "is not",
    "didnt": "did not", "hows": "how is"}

# "how 2 make", "recipe 4 dinner": a digit standing for a word. Never after a determiner
# or one of these nouns ("page 2 of", "version 4 release"), never before a plural.
_DIGIT_WORDS = {"2": "to", "4": "for"}
_DETERMINERS = frozenset(
    "a an the my your our their his her its this that these those each every".split())
_COUNTED_NOUNS = frozenset("page pages chapter level version room gate number no step".split())

_TOKEN = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)*%?")


@dataclass(frozen=True)
class Lexicon:
    """Word relations from WordNet, over the MiniLM vocabulary."""

    vocabulary: frozenset[str]
    rank: dict[str, int]  # position in the tokenizer's vocabulary: lower is more common
    synonym_sets: dict[str, frozenset[int]]
    antonyms: frozenset[tuple[str, str]]
    nouns: frozenset[str]
    verbs: frozenset[str]
    adjectives: frozenset[str]
    adverbs: frozenset[str]


@lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    """The bundled lexicon, loaded once (about 50 ms); raises ConfigurationError if broken."""
    try:
        raw = json.loads(gzip.decompress(_LEXICON_FILE.read_bytes()))
        words = raw["vocabulary"].split()
        parts = raw["parts_of_speech"]
        return Lexicon(
            vocabulary=frozenset(words), rank={word: i for i, word in enumerate(words)},
            synonym_sets={word: frozenset(ids) for word, ids in raw["synonym_sets"].items()},
            antonyms=frozenset(tuple(sorted(pair.split())) for pair in raw["antonyms"]),
            nouns=frozenset(parts["n"].split()), verbs=frozenset(parts["v"].split()),
            adjectives=frozenset(parts["a"].split()), adverbs=frozenset(parts["r"].split()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"the cache's word lexicon {_LEXICON_FILE} is unreadable "
                                 f"or malformed: {exc}") from exc


def _normalise(text: str) -> str:
    lowered = text.casefold().replace("\u2019", "'").replace("\u2018", "'")
    for pattern, replacement in _CONTRACTIONS:
        lowered = re.sub(pattern, replacement, lowered)
    return lowered.replace("-", " ")


@lru_cache(maxsize=8192)
def tokens(text: str) -> tuple[str, ...]:
    """Lower-case words of ``text`` with contractions and texting spellings spelt out."""
    words: list[str] = []
    for token in _TOKEN.findall(_normalise(text)):
        words.extend(_INFORMAL.get(token, token).split())
    verbs = lexicon().verbs
    for i in range(1, len(words) - 1):
        before, word, after = words[i - 1], words[i], words[i + 1]
        if (word in _DIGIT_WORDS and before.isalpha() and after.isalpha()
                and before not in _DETERMINERS and before not in _COUNTED_NOUNS
                and not (after.endswith("s") and after not in verbs)
                and (after in verbs or word == "4")):
            words[i] = _DIGIT_WORDS[word]
    return tuple(words)


_stem = _guard._stem  # one light stemmer for the guard and the second stage


@lru_cache(maxsize=16384)
def lemma(word: str) -> str:
    """``word`` itself when the lexicon knows it as a word with senses, else its stem,
    repaired to a known word where a suffix took a letter ("making" -> "make",
    "running" -> "run")."""
    senses = lexicon().synonym_sets
    if word in senses:
        return word
    stem = _stem(word)
    if stem not in senses and stem != word:
        for repaired in (stem + "e", stem[:-1] if len(stem) > 3 and stem[-1] == stem[-2]
                         else ""):
            if repaired in senses:
                return repaired
    return stem


def known(word: str) -> bool:
    """Whether ``word`` (or its stem) is a whole word of the vocabulary."""
    vocabulary = lexicon().vocabulary
    return word in vocabulary or _stem(word) in vocabulary or word.rstrip("s") in vocabulary


def _edits1(word: str) -> set[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    found = {left + right[1:] for left, right in splits if right}
    found |= {left + right[1] + right[0] + right[2:] for left, right in splits if len(right) > 1}
    found |= {left + c + right[1:] for left, right in splits if right for c in letters}
    found |= {left + c + right for left, right in splits for c in letters}
    return found


@lru_cache(maxsize=8192)
def _corrected(word: str) -> str:
    """The most common vocabulary word one edit away from an unknown word, else the word."""
    if len(word) < 5 or not word.isalpha() or known(word):
        return word
    book = lexicon()
    candidates = [c for c in _edits1(word) if len(c) >= 4 and c in book.vocabulary]
    return min(candidates, key=book.rank.__getitem__) if candidates else word


def embedding_text(text: str) -> str:
    """What the cache embeds: case, spacing, end punctuation, contractions, texting
    spellings and one-edit typos evened out, so "WHATS THE CAPITL OF FRANCE" lands next
    to "What is the capital of France?" (the verifier still checks every word)."""
    return " ".join(_corrected(word) for word in tokens(text)) or text


def _damerau(a: str, b: str) -> int:
    rows = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        rows[i][0] = i
    for j in range(len(b) + 1):
        rows[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[-1][-1]


def is_typo(x: str, y: str, *, names: frozenset[str] = frozenset()) -> bool:
    """Whether ``x`` and ``y`` are one word, one of them mistyped.

    One side must be outside the vocabulary (two real words are two words: "Iran" /
    "Iraq"), the first letter kept (or the first two swapped), no digits ("10am" / "11am"
    is a fact), not opposites, and at most one edit; two for long words that are not
    names (Austria / Australia are two apart).
    """
    if any(c.isdigit() for c in x + y) or min(len(x), len(y)) < 4:
        return False
    if x[0] != y[0] and x[:2] != y[1::-1]:
        return False
    if (known(x) and known(y)) or are_opposites(x, y):
        return False
    limit = 1 if max(len(x), len(y)) < 8 or x in names or y in names else 2
    return abs(len(x) - len(y)) <= limit and _damerau(x, y) <= limit


# Word pairs WordNet does not put in one synonym set but people swap freely in questions
# ("update" / "change", "far" / "distance"): the fact guard's groups.
_SYNONYM_OF = _guard._SYNONYMS

_NEGATING_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non", "de", "anti", "mis")


def are_synonyms(x: str, y: str, *, names: frozenset[str] = frozenset()) -> bool:
    """Same word, one WordNet synonym set, or one derivation ("summary" / "summarize")."""
    if x == y:
        return True
    lx, ly = lemma(x), lemma(y)
    if lx == ly or _SYNONYM_OF.get(lx, lx) == _SYNONYM_OF.get(ly, ly):
        return True
    sets = lexicon().synonym_sets
    empty: frozenset[int] = frozenset()
    if any(sets.get(u, empty) & sets.get(v, empty) for u in {x, lx} for v in {y, ly}):
        return True
    if x in names or y in names:
        return False  # names are not derivations of each other
    common = len(os.path.commonprefix([lx, ly]))
    return common >= 5 and common >= min(len(lx), len(ly)) - 2 and not are_opposites(x, y)


def _bases(word: str) -> set[str]:
    """``word``, its lemma, and the base of an -er / -est form ("strongest" -> "strong")."""
    found = {word, lemma(word), _stem(word)}
    for suffix in ("est", "er"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            base = word[: -len(suffix)]
            found |= {base, base + "e"}
            if base[-1] == base[-2]:
                found.add(base[:-1])  # biggest -> big
            if base.endswith("i"):
                found.add(base[:-1] + "y")  # happiest -> happy
    return found


def are_opposites(x: str, y: str) -> bool:
    """WordNet antonyms (also as -er / -est forms) or a negating prefix ("possible" /
    "impossible", "connect" / "disconnect", "members" / "non members")."""
    antonyms = lexicon().antonyms
    for u in _bases(x):
        for v in _bases(y):
            if (min(u, v), max(u, v)) in antonyms:
                return True
            short, long_ = sorted((u, v), key=len)
            if len(short) > 2 and any(long_ == prefix + short for prefix in _NEGATING_PREFIXES):
                return True
    return False
