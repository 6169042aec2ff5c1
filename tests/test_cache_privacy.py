"""Personal questions stay with their user; shared knowledge stays shared (cache scope)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from budgetkit import ConfigurationError, Engine
from budgetkit.cache._cache import ResponseCache
from budgetkit.cache._embedders import MiniLMEmbedder
from budgetkit.cache._keys import make_request
from budgetkit.cache._privacy import is_personal

MODEL = "gpt-4o-mini"
T0 = dt.datetime(2026, 3, 1, 12, 0, 0)


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


@pytest.mark.parametrize(("text", "personal"), [
    ("What is my account balance?", True),
    ("Where is order 48213?", True),
    ("What's the status of ticket AB12345?", True),
    ("Am I eligible for a refund?", True),
    ("I've been charged twice this month", True),
    ("How much do I owe this month?", True),
    ("How many eggs do I need for a sponge cake?", False),  # first person, no one's data
    ("When does my plan renew?", True),
    ("How do I reset my password?", True),  # kept per user: see _privacy's docstring
    ("How do I get a refund for order 48213?", True),  # a procedure about one record
    ("What is the capital of France?", False),
    ("What is your refund policy?", False),
    ("How do I reverse a list in Python?", False),  # "I" in a how-to asks nothing about me
    ("How do I install python3?", False),
    ("Who won the World Cup in 2022?", False),
])
def test_questions_about_the_asker_are_recognised(text: str, personal: bool) -> None:
    assert is_personal(text) is personal


def test_a_personal_question_is_never_served_to_another_user(cache: ResponseCache) -> None:
    cache.store("£42.10", model=MODEL, prompt="What is my account balance?", user_id="ana")
    for asked in ("What is my account balance?", "what's my account balance"):
        assert cache.lookup(model=MODEL, prompt=asked, user_id="bob") is None
        assert cache.lookup(model=MODEL, prompt=asked) is None  # nor to an unknown user
    exact = cache.lookup(model=MODEL, prompt="What is my account balance?", user_id="ana")
    reworded = cache.lookup(model=MODEL, prompt="what's my account balance", user_id="ana")
    assert exact is not None and exact.kind == "exact" and exact.value == "£42.10"
    assert reworded is not None and reworded.kind == "semantic"


def test_a_personal_conversation_is_keyed_by_user_to_its_last_turn(
        cache: ResponseCache) -> None:
    talk = [{"role": "user", "content": "I ordered a blue kettle last week."},
            {"role": "assistant", "content": "I can see it: it ships tomorrow."},
            {"role": "user", "content": "can you cancel it?"}]
    cache.store("Cancelled.", model=MODEL, messages=talk, user_id="ana")
    assert cache.lookup(model=MODEL, messages=talk, user_id="bob") is None
    assert cache.lookup(model=MODEL, messages=talk, user_id="ana") is not None


def test_shared_knowledge_is_shared_across_users(cache: ResponseCache) -> None:
    cache.store("Paris", model=MODEL, prompt="What is the capital of France?", user_id="ana")
    hit = cache.lookup(model=MODEL, prompt="What is the capital of France?", user_id="bob")
    assert hit is not None and hit.value == "Paris"


def test_scope_option_overrides_the_guess(engine: Engine, embedder: MiniLMEmbedder) -> None:
    per_user = ResponseCache(engine, embedder=embedder, record_hits=False, scope="user",
                             namespace="u")
    per_user.store("Paris", model=MODEL, prompt="What is the capital of France?", user_id="ana")
    assert per_user.lookup(model=MODEL, prompt="What is the capital of France?",
                           user_id="bob") is None
    # one call may widen it again, for an answer the caller knows is common knowledge
    per_user.store("Paris", model=MODEL, prompt="Capital of France?", user_id="ana",
                   scope="shared")
    assert per_user.lookup(model=MODEL, prompt="Capital of France?", user_id="bob",
                           scope="shared") is not None
    shared = ResponseCache(engine, embedder=embedder, record_hits=False, scope="shared",
                           namespace="s")
    shared.store("Open 9-5", model=MODEL, prompt="What are my branch's opening hours?",
                 user_id="ana")
    assert shared.lookup(model=MODEL, prompt="What are my branch's opening hours?",
                         user_id="bob") is not None


def test_bad_scope_or_user_is_a_typed_error(engine: Engine, cache: ResponseCache) -> None:
    with pytest.raises(ConfigurationError, match="scope must be one of"):
        ResponseCache(engine, scope="team")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="scope must be one of"):
        cache.lookup(model=MODEL, prompt="hi", scope="everyone")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="user_id must be a string"):
        cache.store("x", model=MODEL, prompt="What is my balance?", user_id=42)  # type: ignore[arg-type]
    assert len(cache) == 0


def test_the_user_joins_the_key_only_when_personal() -> None:
    def key(prompt: str, user: str | None) -> str:
        return make_request(namespace="n", model="m", prompt=prompt, user_id=user).key
    assert key("What is the capital of France?", "ana") == key(
        "What is the capital of France?", "bob")
    assert key("What is my balance?", "ana") != key("What is my balance?", "bob")
    assert key("What is my balance?", None) != key("What is my balance?", "")
