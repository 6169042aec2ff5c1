"""Response cache on conversations: what earlier turns must match for a semantic hit.

Labelled pairs come from ``../shared/data/cache-eval/`` (fow-cache data, CC BY 4.0); the
rules were tuned on its billing files, so the pairs asserted here are billing ones.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from budgetkit import Engine
from budgetkit.cache._cache import ResponseCache
from budgetkit.cache._keys import is_standalone, make_request
from budgetkit.cache._embedders import MiniLMEmbedder

MODEL = "gpt-4o-mini"
T0 = dt.datetime(2026, 3, 1, 12, 0, 0)
EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cache-eval"


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    with Engine(tmp_path / "cache.db", clock=lambda: T0) as engine:
        yield engine


@pytest.fixture
def cache(engine: Engine, embedder: MiniLMEmbedder) -> ResponseCache:
    return ResponseCache(engine, embedder=embedder, sync_interval=0.0, record_hits=False)


@pytest.fixture(scope="module")
def labelled() -> dict[str, dict[str, Any]]:
    files = sorted(EVAL.glob("conv-*/billing.jsonl"))
    if not files:
        pytest.skip(f"multi-turn evaluation data not found under {EVAL}")
    rows = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    return {row["id"]: row for row in rows}


def turns(*texts: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    return messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(texts)]


# -- labelled pairs -------------------------------------------------------------------------
@pytest.mark.parametrize("pair_id", ["conv-billing-041", "conv-billing-042",
                                     "conv-billing-046"])
def test_standalone_question_is_served_whatever_came_before(
        engine: Engine, embedder: MiniLMEmbedder, labelled: dict[str, dict[str, Any]],
        pair_id: str) -> None:
    pair = labelled[pair_id]
    assert pair["subtype"] == "irrelevant_history" and pair["a"] != pair["b"]
    cache = ResponseCache(engine, embedder=embedder, record_hits=False)
    strict = ResponseCache(engine, embedder=embedder, record_hits=False,
                           standalone_turns=False, namespace="strict")
    for each in (cache, strict):
        each.store(pair["id"], model=MODEL, messages=pair["a"])
    hit = cache.lookup(model=MODEL, messages=pair["b"])
    assert hit is not None and hit.value == pair["id"] and hit.kind == "semantic"
    # with every earlier turn in the key (the behaviour before) it is a miss
    assert strict.lookup(model=MODEL, messages=pair["b"]) is None


@pytest.mark.parametrize("pair_id", [
    "conv-billing-001",       # context_swap: "cancel it" after another subscription
    "conv-billing-028",       # intent_flip: "the first one" of two offers in swapped order
    "conv-billing-030",       # intent_flip: "yes please" to a different offer
    "conv-long-billing-006",  # detail_swap: "freeze it", the other card, 40 turns in
    "conv-long-billing-008",  # detail_swap: "add Ellie. what will my monthly payment be?"
])
def test_traps_ending_with_the_same_words_are_not_served(
        cache: ResponseCache, labelled: dict[str, dict[str, Any]], pair_id: str) -> None:
    pair = labelled[pair_id]
    last_a, last_b = (pair[side][-1]["content"].casefold().strip(" .?!") for side in "ab")
    assert not pair["same_answer"] and last_a == last_b
    cache.store(pair["id"], model=MODEL, messages=pair["a"])
    assert cache.lookup(model=MODEL, messages=pair["b"]) is None
    assert cache.lookup(model=MODEL, messages=pair["a"]) is not None  # the cached one is


# -- the rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Does Flixora offer a free trial?", True),
    ("Is PulseFit open on Christmas Day?", True),
    ("Can I use Tunely on an Apple Watch?", True),
    ("cancel it", False),                                      # points back
    ("yes please", False),
    ("and with the TV add-on?", False),                        # a continuation
    ("what will my monthly payment be with Covera?", False),   # the asker's own details
    ("How does the Premium plan compare to that one?", False),
    ("can you just read back everything I've booked?", False),  # "I've" names nothing
    ("What's the daily limit for cash machines?", False),      # names nothing: not sure
])
def test_is_standalone(text: str, expected: bool) -> None:
    assert is_standalone(text) is expected


def test_keys_stay_exact_and_single_turns_unchanged() -> None:
    history = turns("hi", "Hello! How can I help?", "Does Flixora offer a free trial?")
    other = turns("thanks", "Anything else?", "Does Flixora offer a free trial?")
    a, b = (make_request(namespace="n", model=MODEL, messages=m) for m in (history, other))
    assert a.key != b.key  # the exact key still covers every message
    assert a.context_hash == b.context_hash and a.standalone
    # a first question keeps its partition: conversations are not served from it
    lone = make_request(namespace="n", model=MODEL, messages=history[-1:])
    assert lone.context_hash == "" != a.context_hash and not lone.standalone
    assert lone.partitions("e") == [lone.partition("e")]
    off = make_request(namespace="n", model=MODEL, messages=history, standalone_turns=False)
    assert off.context_hash == off.exact_context_hash != ""


def test_system_messages_still_separate_standalone_questions(cache: ResponseCache) -> None:
    asked = turns("hi", "Hello!", "Does Flixora offer a free trial?", system="You are terse.")
    cache.store("yes, 7 days", model=MODEL, messages=asked)
    after_other_talk = turns("morning", "Morning!", "Does Flixora have a free trial?",
                             system="You are terse.")
    assert cache.lookup(model=MODEL, messages=after_other_talk) is not None
    other_system = [{"role": "system", "content": "You are chatty."}, *after_other_talk[1:]]
    assert cache.lookup(model=MODEL, messages=other_system) is None


def test_dependent_rewording_is_served_only_in_the_same_conversation(
        cache: ResponseCache) -> None:
    history = ["I watch a lot of films.", "Flixora has a big film library."]
    cache.store("yes, 7 days", model=MODEL,
                messages=turns(*history, "Does Flixora offer a free trial?"))
    # reworded so that it points back ("then"): same conversation, so still served
    same = turns(*history, "Does Flixora offer a free trial then?")
    hit = cache.lookup(model=MODEL, messages=same)
    assert hit is not None and hit.value == "yes, 7 days"
    # the same dependent words after another conversation are not
    other = turns("I mostly listen to music.", "Tunely has a big library.",
                  "Does Flixora offer a free trial then?")
    assert cache.lookup(model=MODEL, messages=other) is None


def test_standalone_entries_survive_restart_and_match_patterns(
        tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    asked = turns("hi", "Hello!", "Does Flixora offer a free trial?")
    with Engine(tmp_path / "c.db", clock=lambda: T0) as engine:
        ResponseCache(engine, embedder=embedder).store("yes", model=MODEL, messages=asked)
    with Engine(tmp_path / "c.db", clock=lambda: T0) as engine:
        cache = ResponseCache(engine, embedder=embedder, record_hits=False)
        later = turns("thanks for earlier", "Any time!", "Does Flixora have a free trial?")
        assert cache.lookup(model=MODEL, messages=later) is not None
        # the pattern sees the question, not what the cache keeps beside it
        assert cache.invalidate(pattern="*free trial?") == 1
        assert cache.lookup(model=MODEL, messages=later) is None


OWN = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "cache-pairs" / \
    "conversations.jsonl"


def _own(split: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in OWN.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["split"] == split]


@pytest.mark.parametrize("pair", [p for p in _own("dev") if not p["same_answer"]],
                         ids=lambda p: f"{p['id']}-{p['subtype']}")
def test_follow_ups_that_choose_or_correct_are_never_served_across_conversations(
        cache: ResponseCache, pair: dict[str, Any]) -> None:
    """The last messages are identical; the options or the turn they correct are not."""
    assert pair["a"][-1]["content"] == pair["b"][-1]["content"]
    cache.store("answer for a", model=MODEL, messages=pair["a"])
    assert cache.lookup(model=MODEL, messages=pair["b"]) is None
    assert cache.lookup(model=MODEL, messages=pair["a"]) is not None  # its own: served


@pytest.mark.parametrize("pair", [p for p in _own("dev") if p["same_answer"]],
                         ids=lambda p: p["id"])
def test_a_standalone_question_after_small_talk_is_served(
        cache: ResponseCache, pair: dict[str, Any]) -> None:
    cache.store("answer for a", model=MODEL, messages=pair["a"])
    hit = cache.lookup(model=MODEL, messages=pair["b"])
    assert hit is not None and hit.value == "answer for a"


def test_what_makes_a_last_message_depend_on_the_conversation() -> None:
    options = [{"role": "user", "content": "Which plans are there?"},
               {"role": "assistant", "content": "Starter is £10 with 5GB; Plus is £20 with 50GB."}]
    question = "Which of the Starter and Plus plans is better for streaming video?"
    assert is_standalone(question)  # alone it names its things...
    assert not is_standalone(question, options)  # ...which the conversation defined
    assert not is_standalone("Actually, can Luigi's do it on Saturday instead?")
    assert not is_standalone("Sorry, I meant Canadian dollars to euros.")
    # naming the company the chat is with is not choosing between things it said
    assert is_standalone("Does Flixora offer a free trial for students?",
                         [{"role": "user", "content": "My Flixora app keeps crashing."}])
