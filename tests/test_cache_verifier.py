"""The second stage: every difference between two questions explained, or refused by kind.

Cosines are passed in, so each case tests the verifier's reading of the words alone; the
end-to-end tests (a real embedder, a real cache) are in tests/test_cache.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from budgetkit.cache import _text
from budgetkit.cache._text import embedding_text, is_typo, lexicon, tokens
from budgetkit.cache._verifier import verify
from budgetkit.errors import ConfigurationError

HIGH = 0.97  # a cosine a look-alike easily reaches: the words must decide


def _verdict(cached: str, asked: str, cosine: float = HIGH) -> tuple[bool, str]:
    verdict = verify(cached, asked, cosine, threshold=0.85)
    return verdict.same, verdict.reason


@pytest.mark.parametrize(("cached", "asked"), [
    ("What is the capital of Australia?", "WHAT IS THE CAPITAL OF AUSTRALIA"),
    ("How do I install Docker on Ubuntu?", "how do i install docker on ubuntu"),
    ("How do I reverse a list in Python?", "  How do I reverse a list   in Python ?"),
    ("How do I merge two dictionaries in Python?", "How do I merge two dictionaires in Python?"),
    ("Who painted the Mona Lisa?", "Who painted the Mona Lsia?"),
    ("How do I make pancakes?", "how 2 make pancakes"),
    ("What is your refund policy?", "whats ur refund policy?"),
    ("Which planet is closest to the sun?", "What planet is nearest to the sun?"),
    ("How do I update my shipping address?", "How can I change my shipping address?"),
])
def test_form_and_synonyms_are_explained(cached: str, asked: str) -> None:
    assert _verdict(cached, asked) == (True, "same content")


@pytest.mark.parametrize(("cached", "asked", "reason"), [
    ("What is the capital of Australia?", "What is the capital of Austria?", "entity"),
    ("how do i reverse a list in python", "how do i reverse a list in javascript", "entity"),
    ("Is Iran in the Middle East?", "Is Iraq in the Middle East?", "entity"),
    ("how do cats communicate", "how do dolphins communicate", "swap"),
    ("Is it possible to travel faster than light?",
     "Is it impossible to travel faster than light?", "opposite"),
    ("Which countries are members of NATO?", "Which countries are non-members of NATO?",
     "negation"),
    ("How do I increase my credit score?", "How do I decrease my credit score?", "opposite"),
    ("What is the strongest metal?", "What is the weakest metal?", "opposite"),
    ("Why don't some people like cilantro?", "Why do some people like cilantro?", "negation"),
    ("Track order 48213", "Track order 48231", "number"),
    ("Is the shop open at 10am?", "Is the shop open at 11am?", "swap"),
    ("Recommend three books about history.", "Recommend 5 books about history.", "number"),
    ("What is the weather forecast for Monday?", "What is the weather forecast for Friday?",
     "date"),
    ("How do I cook rice?", "How do I cook brown rice?", "scope"),
    ("What are the symptoms of flu?", "What are the symptoms of flu in children?", "scope"),
    ("How do I lose weight?", "How do I lose weight quickly?", "scope"),
    ("How long is the flight from London to New York?",
     "How long is the flight from New York to London?", "order"),
    ("Is Python faster than Java?", "Is Java faster than Python?", "order"),
    ("How do I transfer money from savings to checking?",
     "How do I transfer money from checking to savings?", "order"),
])
def test_look_alikes_are_refused_by_kind(cached: str, asked: str, reason: str) -> None:
    assert _verdict(cached, asked) == (False, reason)


@pytest.mark.parametrize(("cached", "asked"), [
    # participles WordNet lists only as verbs (or not at all), written for this test
    ("How do I convert a PDF to Word?", "How do I convert a scanned PDF to Word?"),
    ("How do I open the file in Excel?", "How do I open the downloaded file in Excel?"),
    ("Can I print my photos at home?", "Can I print my edited photos at home?"),
])
def test_a_participle_before_a_shared_noun_narrows_it(cached: str, asked: str) -> None:
    assert _verdict(cached, asked) == (False, "scope")
    assert _verdict(asked, cached) == (False, "scope")


def test_the_noun_of_a_wh_phrase_is_not_a_qualifier() -> None:
    assert _verdict("What is the capital of France?", "Which city is the capital of France?")[0]
    assert _verdict("Who painted the Mona Lisa?", "Which artist painted the Mona Lisa?")[0]
    assert _verdict("How many legs does a spider have?", "How many legs do spiders have?") == \
        (True, "same content")


def test_a_time_span_in_other_words_is_no_swap_but_an_action_is() -> None:
    assert _verdict("How do I follow a playlist on Spotify?",
                    "How do I share a playlist on Spotify?") == (False, "swap")
    assert _verdict("How much water should I drink a day?",
                    "How much water should I drink daily?") == (True, "same content")
    assert _verdict("How can I learn to code for free?",
                    "What are free ways to learn coding?")[1] != "order"  # "learn" is no thing
    assert _verdict("How long should I cook chicken breast?",
                    "How long should I bake chicken breast?") == (False, "swap")


def test_cosines_still_gate_what_the_words_allow() -> None:
    explained = ("How does photosynthesis work?", "How does photosyntesis work?")
    assert verify(*explained, 0.49, threshold=0.85).same is False
    assert verify(*explained, 0.51, threshold=0.85).same is True
    reworded = ("What is the population of Tokyo?", "How many people live in Tokyo?")
    assert verify(*reworded, 0.84, threshold=0.85).same is False
    assert verify(*reworded, 0.86, threshold=0.85).same is True


def test_typos_are_not_names_numbers_or_opposites() -> None:
    assert is_typo("capitl", "capital")
    assert not is_typo("iran", "iraq")  # two real words
    assert not is_typo("austria", "australia", names=frozenset({"austria", "australia"}))
    assert not is_typo("10am", "11am")
    assert not is_typo("efficient", "inefficient")
    assert not is_typo("python", "cython")  # a different first letter


def test_texting_digits_are_words_only_where_a_word_fits() -> None:
    assert tokens("how 2 make pancakes") == ("how", "to", "make", "pancakes")
    assert tokens("recommend 2 books") == ("recommend", "2", "books")
    assert tokens("a 4 person tent") == ("a", "4", "person", "tent")


def test_embedding_text_evens_out_form_only() -> None:
    assert embedding_text("WHAT'S  the capitl of France?!") == "what is the capital of france"
    assert embedding_text("What is the capital of Austria?") != \
        embedding_text("What is the capital of Australia?")


def test_the_shipped_lexicon_is_whole_and_a_broken_one_is_a_typed_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book = lexicon()
    assert ("decrease", "increase") in book.antonyms
    assert book.synonym_sets["sofa"] & book.synonym_sets["couch"]
    assert "brown" in book.adjectives and len(book.vocabulary) > 20_000
    broken = tmp_path / "lexicon.json.gz"
    broken.write_bytes(b"not gzip")
    monkeypatch.setattr(_text, "_LEXICON_FILE", broken)
    lexicon.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="lexicon"):
            lexicon()
    finally:
        lexicon.cache_clear()


def test_dev_pairs_stay_separated() -> None:
    """The development pairs the rules were written against, at their real cosines (not a
    quality figure: those come from test-only pairs in benchmarks/bench_cache_quality.py).
    One look-alike is served, knowingly: WordNet puts "rent" and "lease" in one synset."""
    from budgetkit.cache import MiniLMEmbedder

    path = Path(__file__).parents[1] / "benchmarks" / "data" / "cache-pairs" / "dev.jsonl"
    pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    model = MiniLMEmbedder()
    served = {}
    for pair in pairs:
        a, b = model([embedding_text(pair["a"]), embedding_text(pair["b"])])
        served[pair["b"]] = verify(pair["a"], pair["b"], float(a @ b), threshold=0.85).same
    assert [p["b"] for p in pairs if not p["same_answer"] and served[p["b"]]] == \
        ["How do I lease a car in Spain?"]
    same = [p for p in pairs if p["same_answer"]]
    assert sum(served[p["b"]] for p in same) / len(same) > 0.75


def test_a_cache_serves_case_spacing_and_typo_variants_but_not_look_alikes(
        tmp_path: Path) -> None:
    from budgetkit import Engine
    from budgetkit.cache import MiniLMEmbedder, ResponseCache

    with Engine(tmp_path / "cache.db") as engine:
        cache = ResponseCache(engine, embedder=MiniLMEmbedder(), record_hits=False)
        cache.store("Canberra", model="gpt-4o-mini", prompt="What is the capital of Australia?")
        for variant in ("WHAT IS THE CAPITAL OF AUSTRALIA", "what is the capital of australia",
                        "  What is the capital   of Australia ?", "Whats the capitl of Australia"):
            hit = cache.lookup(model="gpt-4o-mini", prompt=variant)
            assert hit is not None and hit.value == "Canberra", variant
        for trap in ("What is the capital of Austria?", "WHAT IS THE CAPITAL OF AUSTRIA",
                     "What was the capital of Australia in 1900?"):
            assert cache.lookup(model="gpt-4o-mini", prompt=trap) is None, trap
        assert cache.stats().refused_by_guard >= 2
