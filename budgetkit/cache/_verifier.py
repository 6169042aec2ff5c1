"""The second stage: would the stored question's answer also answer the new one?

The vector index finds candidates; this decides. Sentence embeddings put "capital of
Australia" next to "capital of Austria" and "cook rice" next to "cook brown rice", so a
cosine alone cannot tell a reworded question from a different one (measured in
``benchmarks/bench_cache_quality.py``). The verifier aligns the two questions word by word
and tries to *explain* every difference:

1. **form** (:mod:`._text`): case, spacing, contractions, texting spellings, typos;
2. **facts that change an answer** (refused): numbers, dates, negation and exclusion
   counts, opposite words (WordNet antonyms, negating prefixes), polarity pairs of the
   fact guard, the same two things swapped around "to / than / vs / from";
3. **words on one side only**: refused when they narrow the question (an adjective or
   adverb, a modifier right before a shared noun, a noun in a phrase of its own: "brown
   rice", "lose weight quickly", "symptoms in children") or name something (an entity);
4. **swapped words**: explained by a synonym set or a derivation, else refused when a
   single word was swapped for another ("cats" / "dogs").

What is left is either nothing (same content: served above a low cosine) or a rewording
with several differences (served only above the cache's threshold). A refused paraphrase
costs one model call; a served trap costs a wrong answer, so unexplained means refused.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from . import _guard
from ._text import (are_opposites, are_synonyms, is_typo, known, lemma, lexicon,
                    tokens)

__all__ = ["Verdict", "verify", "SAME_CONTENT_THRESHOLD"]

#: Least cosine (of the normalised texts) served when every difference was explained.
#: Chosen on the dev and tuning pairs (benchmarks/data/cache-pairs/README.md): below it
#: even same-content pairs are mostly heavy typos the embedder no longer places nearby.
SAME_CONTENT_THRESHOLD = 0.50

_FILLERS = frozenset("hi hello hey thanks thank please ok okay so well actually really "
                     "basically just kindly guys folks".split())
_STOP = (_guard._STOPWORDS - {"used", "first", "last", "quick"}) | _FILLERS
_NEGATIONS = frozenset("not no never without none nobody nothing neither nor nowhere non "
                       "except excluding unless".split())
_DIRECTIONAL = {"to": "to", "into": "to", "onto": "to", "towards": "to", "than": "than",
                "vs": "vs", "versus": "vs", "from": "from"}
_WH = frozenset("what which whose how".split())
# head nouns that only name the kind of answer asked for ("the meaning of", "which way")
_LIGHT = frozenset("way ways kind sort type name meaning purpose method methods reason "
                   "reasons thing things step steps process procedure command code option "
                   "options idea tip tips advice information detail details fact facts".split())
_PREPOSITIONS = frozenset("in on at for with without after before during under over near "
                          "from by about among between within via per".split())
_BE = frozenset("is are was were be been being am".split())
# words that open a noun phrase: a participle right after one is attributive ("a scanned PDF")
_DETERMINERS = frozenset("a an the my your our their his her its this that these those some "
                         "any each every".split())
_UNITS = frozenset("week month year decade century hour minute day daily weekly monthly "
                   "yearly annual annually hourly".split())
# the same span of time in other words ("a day" / "daily", "now" / "currently")
_SAME_TIME = {"daily": "day", "weekly": "week", "monthly": "month", "yearly": "year",
              "annual": "year", "annually": "year", "hourly": "hour", "current": "now",
              "currently": "now", "now": "now"}
_ROMAN = {"II": "#2", "III": "#3", "IV": "#4", "VI": "#6", "VII": "#7", "VIII": "#8",
          "IX": "#9", "XI": "#11", "XII": "#12"}


@dataclass(frozen=True)
class Verdict:
    """Whether to serve, and the kind of difference that decided it."""

    same: bool
    reason: str  # "same content", "reworded", or what was refused: "number", "scope", ...


def _entities(raw: str, words: tuple[str, ...]) -> frozenset[str]:
    """Named things: capitalised words when the text has mixed case (in all capitals or
    all lower case, capitals say nothing), quoted text, and known names in any case."""
    letters = [c for c in raw if c.isalpha()]
    mixed = any(c.isupper() for c in letters) and any(c.islower() for c in letters)
    found: set[str] = set()
    if mixed:
        for entity in _guard._entities(raw):
            for word in tokens(entity.removeprefix("q:")):
                if (len(word) >= 2 and not word.isdigit() and word.upper() not in _ROMAN
                        and (word not in _STOP or word == "us")):  # "the US"
                    found.add(word)
    found.update(word for word in words if word in _guard._ENTITY_WORDS)
    return frozenset(found)


def _content(words: tuple[str, ...] | list[str]) -> list[str]:
    kept = []
    for i, word in enumerate(words):
        if word in _STOP or word in _NEGATIONS or (len(word) < 2 and not word.isdigit()):
            continue
        if word == "used" and ((i and words[i - 1] in _BE) or list(words[i + 1:i + 2]) == ["to"]):
            continue  # "is used in", "used to" are verbs; "a used car" narrows
        kept.append(word)
    return kept


def _times(words: list[str]) -> set[str]:
    found = set()
    for i, word in enumerate(words):
        if word in ("current", "currently"):
            found.add("now")
        elif word in _guard._TIME_WORDS and word not in _UNITS and word != "this":
            found.add(_guard._MONTH_ABBREVIATIONS.get(word, word))
        elif lemma(word) in _UNITS and not (i and words[i - 1] in _WH):
            # "per month" is a fact; "in what year" asks for one
            found.add(_SAME_TIME.get(word, lemma(word)))
    return found


def _roman(raw: str) -> set[str]:
    """Roman numerals written in capitals ("World War II") as ordinals ("second")."""
    stripped = (word.strip("?.,!;:") for word in raw.split())
    return {_ROMAN[word] for word in stripped if word in _ROMAN}


def _swapped_around(a: list[str], b: list[str], keep: frozenset[str]) -> bool:
    """The same things on opposite sides of "to / than / vs / from" ("London to New York"
    / "New York to London", "Python faster than Java" / "Java faster than Python")."""
    def frames(words: list[str]) -> list[tuple[str, set[str], set[str]]]:
        found = []
        for i, word in enumerate(words):
            if word in _DIRECTIONAL:
                def near(part: list[str]) -> set[str]:
                    return {lemma(w) for w in part
                            if (w not in _STOP or w in keep) and w not in _DIRECTIONAL}
                found.append((_DIRECTIONAL[word], near(words[max(0, i - 3):i]),
                              near(words[i + 1:i + 4])))
        return found
    def things(words: set[str]) -> bool:  # what is moved must be a thing, not "learn"
        book = lexicon()
        return any(w in keep or w in book.nouns or not known(w) for w in words)
    return any(da == db and things(la & rb) and things(ra & lb)
               for da, la, ra in frames(a) for db, lb, rb in frames(b))


def _qualifiers(words: list[str], extra: list[str], other_content: list[str]) -> list[str]:
    """Words of ``extra`` that narrow what is asked (see the module docstring)."""
    book = lexicon()
    shared = {lemma(word) for word in other_content}
    found = []
    for i, word in enumerate(words):
        if word not in extra or word in _LIGHT:
            continue
        before = words[i - 1] if i else ""
        before2 = words[i - 2] if i > 1 else ""
        if (before in _WH or (before in ("the", "a", "an") and before2 in _WH)
                or (before == "many" and before2 == "how")):
            continue  # "which city", "in what year": the kind of answer, not a condition
        after = words[i + 1] if i + 1 < len(words) else ""
        nounish = word in book.nouns or word in book.adjectives or not known(word)
        describes = ((word in book.adjectives or word in book.adverbs)
                     and word not in book.verbs and word not in book.nouns)
        modifies = (nounish and lemma(after) in shared
                    and (after in book.nouns or lemma(after) in book.nouns))
        own_phrase = nounish and any(w in _PREPOSITIONS for w in words[max(0, i - 3):i])
        # a past participle between a determiner and a shared noun narrows it like an
        # adjective ("a scanned PDF", "the downloaded file"): WordNet lists most only as verbs
        participle = (word.endswith(("ed", "en")) and word not in book.nouns
                      and (lemma(word) in book.verbs or word in book.verbs))
        attributive = (participle and (before in _DETERMINERS or before in _PREPOSITIONS)
                       and lemma(after) in shared and after not in _STOP)  # its noun
        if describes or modifies or own_phrase or attributive:
            found.append(word)
    return found


def verify(cached: str, asked: str, cosine: float, *, threshold: float,
           same_content_threshold: float = SAME_CONTENT_THRESHOLD) -> Verdict:
    """Whether the answer stored for ``cached`` answers ``asked``.

    ``cosine``: of the two questions' normalised texts (:func:`._text.embedding_text`).
    ``threshold``: least cosine for a rewording with unexplained differences;
    ``same_content_threshold``: least cosine once every difference is explained.
    """
    words_a, words_b = list(tokens(cached)), list(tokens(asked))
    entities_a, entities_b = _entities(cached, tokens(cached)), _entities(asked, tokens(asked))
    names = entities_a | entities_b
    # read a typo or texting digit on the new side as the word it stands for
    matcher = difflib.SequenceMatcher(a=words_a, b=words_b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "replace":
            for x, j in zip(words_a[i1:i2], range(j1, j2)):
                if is_typo(x, words_b[j], names=names):
                    words_b[j] = x
    facts_a = _guard.extract_facts(" ".join(words_a))
    facts_b = _guard.extract_facts(" ".join(words_b))
    if set(facts_a.numbers) | _roman(cached) != set(facts_b.numbers) | _roman(asked):
        return Verdict(False, "number")
    if _times(words_a) != _times(words_b):
        return Verdict(False, "date")
    if sum(w in _NEGATIONS for w in words_a) != sum(w in _NEGATIONS for w in words_b):
        return Verdict(False, "negation")
    axes_a = {axis for axis, _ in facts_a.poles}
    if any(axis in axes_a and (axis, pole) not in facts_a.poles for axis, pole in facts_b.poles):
        return Verdict(False, "opposite")
    if _swapped_around(words_a, words_b, names):
        return Verdict(False, "order")
    # numbers bound to other words ("option 1 is X, option 2 is Y" / the reverse) need two
    if len(facts_a.numbers) > 1 and (_guard._rebound(facts_a, facts_b)
                                     or _guard._rebound(facts_b, facts_a)):
        return Verdict(False, "order")
    content_a, content_b = _content(words_a), _content(words_b)
    only_a = [w for w in content_a if w not in content_b]
    only_b = [w for w in content_b if w not in content_a]
    if any(are_opposites(x, y) for x in only_a for y in only_b):
        return Verdict(False, "opposite")
    left_a, left_b = list(only_a), list(only_b)
    for x in only_a:
        for y in left_b:
            if (are_synonyms(x, y, names=names) or is_typo(x, y, names=names)
                    or _SAME_TIME.get(x, lemma(x)) == _SAME_TIME.get(y, lemma(y))):
                left_a.remove(x)
                left_b.remove(y)
                break
    stems_a, stems_b = {lemma(w) for w in content_a}, {lemma(w) for w in content_b}
    left_a = [w for w in left_a if lemma(w) not in stems_b]  # plural, tense
    left_b = [w for w in left_b if lemma(w) not in stems_a]
    # a word explained by a function word of the other side ("different" / "difference")
    left_a = [w for w in left_a if not any(are_synonyms(w, o, names=names) for o in words_b
                                           if o in _STOP and len(o) > 3)]
    left_b = [w for w in left_b if not any(are_synonyms(w, o, names=names) for o in words_a
                                           if o in _STOP and len(o) > 3)]
    lemmas_a, lemmas_b = {lemma(w) for w in words_a}, {lemma(w) for w in words_b}
    if any(lemma(e) not in lemmas_b and lemma(e) in map(lemma, left_a) for e in entities_a) or \
            any(lemma(e) not in lemmas_a and lemma(e) in map(lemma, left_b) for e in entities_b):
        return Verdict(False, "entity")
    if not left_a and not left_b:
        return Verdict(cosine >= same_content_threshold, "same content")
    if ((_qualifiers(words_a, left_a, content_b) and not left_b)
            or (_qualifiers(words_b, left_b, content_a) and not left_a)):
        return Verdict(False, "scope")
    # one word swapped for another changes the answer, be it a thing ("cats" / "dogs") or
    # an action ("follow" / "share" a playlist, "pass" / "fail"): a verb swap is refused
    # too, though it costs rewordings like "stop" / "prevent" (measured: serving those at
    # a high cosine let antonym verbs WordNet does not list through)
    if len(left_a) == 1 and len(left_b) == 1 and not ({left_a[0], left_b[0]} & _LIGHT):
        return Verdict(False, "swap")
    return Verdict(cosine >= threshold, "reworded")
