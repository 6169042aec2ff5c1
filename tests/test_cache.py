"""Response cache: exact keys, semantic hits, the guard, tenants, TTL, LRU, persistence."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from budgetkit import ConfigurationError, Engine
from budgetkit.cache._cache import ResponseCache
from budgetkit.cache._embedders import MiniLMEmbedder

MODEL = "gpt-4o-mini"
T0 = dt.datetime(2026, 3, 1, 12, 0, 0)
PAIRS = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "cache-pairs"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(tmp_path: Path, clock: Clock) -> Engine:
    with Engine(tmp_path / "cache.db", clock=clock) as engine:
        yield engine


@pytest.fixture
def cache(engine: Engine, embedder: MiniLMEmbedder) -> ResponseCache:
    return ResponseCache(engine, embedder=embedder, sync_interval=0.0)


# -- exact keys -----------------------------------------------------------------------------
def test_exact_hit_needs_every_part_of_the_key(cache: ResponseCache) -> None:
    base = {"model": MODEL, "prompt": "List three prime numbers.",
            "params": {"temperature": 0.2, "stop": ["\n"]}}
    cache.store("2, 3, 5", **base)
    hit = cache.lookup(**base, semantic=False)
    assert hit is not None and hit.kind == "exact" and hit.value == "2, 3, 5"
    changed = [
        {**base, "prompt": "List three prime numbers!"},
        {**base, "model": "gpt-4o"},
        {**base, "params": {"temperature": 0.3, "stop": ["\n"]}},
        {**base, "params": {"temperature": 0.2, "stop": ["\n\n"]}},
        {**base, "params": {**base["params"], "tools": [{"name": "calc"}]}},
        {**base, "params": {**base["params"], "response_format": {"type": "json_object"}}},
    ]
    for variant in changed:
        assert cache.lookup(**variant, semantic=False) is None, variant
    # transport settings never change the answer
    same = {**base, "params": {**base["params"], "timeout": 30, "max_retries": 5}}
    assert cache.lookup(**same, semantic=False) is not None


def test_messages_key_covers_the_whole_conversation(cache: ResponseCache) -> None:
    convo = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "Cancel it."}]
    cache.store("Done.", model=MODEL, messages=convo)
    assert cache.lookup(model=MODEL, messages=convo) is not None
    other_system = [{"role": "system", "content": "You are chatty."}, convo[1]]
    assert cache.lookup(model=MODEL, messages=other_system) is None


# -- semantic hits and the guard ----------------------------------------------------------
def test_paraphrase_is_served_semantically(cache: ResponseCache) -> None:
    cache.store("Paris", model=MODEL, prompt="What is the capital of France?")
    hit = cache.lookup(model=MODEL, prompt="Which city is the capital of France?")
    assert hit is not None and hit.kind == "semantic"
    assert cache.threshold <= hit.similarity < 1.0


@pytest.mark.parametrize("cached, asked", [
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("Who won the World Cup in 2018?", "Who won the World Cup in 2022?"),
    ("Which foods are safe for dogs to eat?", "Which foods are not safe for dogs to eat?"),
    ("How do I enable two-factor authentication?", "How do I disable two-factor authentication?"),
    ("Convert 100 dollars to euros.", "Convert 250 dollars to euros."),
    ("Convert 100 dollars to euros.", "Convert 100 euros to dollars."),
])
def test_guard_refuses_traps_even_at_any_threshold(engine: Engine, embedder: MiniLMEmbedder,
                                                   cached: str, asked: str) -> None:
    guarded = ResponseCache(engine, embedder=embedder, threshold=0.0)
    guarded.store("cached answer", model=MODEL, prompt=cached)
    assert guarded.lookup(model=MODEL, prompt=asked) is None
    assert guarded.stats().refused_by_guard == 1
    unguarded = ResponseCache(engine, embedder=embedder, threshold=0.0, guard=False,
                              namespace="no-guard")
    unguarded.store("cached answer", model=MODEL, prompt=cached)
    assert unguarded.lookup(model=MODEL, prompt=asked) is not None  # why the guard exists


def _pairs(split: str) -> list[dict]:
    return [json.loads(line) for line in (PAIRS / f"{split}.jsonl").read_text().splitlines()]


def test_tuning_pairs_serve_paraphrases_and_no_traps(engine: Engine,
                                                     embedder: MiniLMEmbedder) -> None:
    served = {True: 0, False: 0}
    pairs = _pairs("tuning")
    cache = ResponseCache(engine, embedder=embedder)
    for number, pair in enumerate(pairs):  # one namespace per pair: one cached question
        cache.store("answer", model=MODEL, prompt=pair["a"], namespace=f"pair-{number}")
        if cache.lookup(model=MODEL, prompt=pair["b"], namespace=f"pair-{number}",
                        record=False) is not None:
            served[pair["same_answer"]] += 1
    positives = sum(pair["same_answer"] for pair in pairs)
    assert served[False] <= 0.01 * (len(pairs) - positives)
    assert served[True] >= 0.5 * positives


def test_conversations_ending_alike_are_not_served_across_contexts(
        engine: Engine, embedder: MiniLMEmbedder) -> None:
    """The 240 labelled multi-turn pairs: every trap ends with the same user message."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "cache-eval"
    files = sorted(root.glob("conv-*/*.jsonl"))
    if not files:
        pytest.skip(f"multi-turn evaluation data not found under {root}")
    pairs = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert len(pairs) == 240
    cache = ResponseCache(engine, embedder=embedder)
    false_hits = 0
    for pair in pairs:
        cache.store(pair["id"], model=MODEL, messages=pair["a"])
    for pair in pairs:
        hit = cache.lookup(model=MODEL, messages=pair["b"], record=False)
        if hit is not None and (not pair["same_answer"] or hit.value != pair["id"]):
            false_hits += 1
    assert false_hits == 0
    # same conversation, last message reworded: served
    convo = pairs[0]["a"]
    reworded = [*convo[:-1], {"role": "user", "content": convo[-1]["content"] + " please"}]
    assert cache.lookup(model=MODEL, messages=reworded, record=False) is not None


# -- tenants and models -------------------------------------------------------------------
def test_nothing_is_served_across_namespaces_or_models(cache: ResponseCache) -> None:
    cache.store("tenant A's answer", model=MODEL, prompt="What is our refund policy?",
                namespace="tenant-a")
    for namespace, model in (("tenant-b", MODEL), ("tenant-a", "gpt-4o")):
        for semantic in (False, True):
            for prompt in ("What is our refund policy?", "Can you tell me our refund policy?"):
                assert cache.lookup(model=model, prompt=prompt, namespace=namespace,
                                    semantic=semantic) is None
    assert cache.lookup(model=MODEL, prompt="Can you tell me our refund policy?",
                        namespace="tenant-a") is not None


# -- lifetime, size, invalidation -------------------------------------------------------------
@pytest.mark.parametrize("task_type, ttl", [
    ("factual_qa", dt.timedelta(days=7)), ("summarization", dt.timedelta(hours=24)),
    ("code_generation", dt.timedelta(hours=1)), (None, dt.timedelta(hours=24)),
])
def test_ttl_by_task_type(cache: ResponseCache, clock: Clock, task_type: str | None,
                          ttl: dt.timedelta) -> None:
    cache.store("x", model=MODEL, prompt="Q", task_type=task_type)
    clock.now = T0 + ttl - dt.timedelta(seconds=1)
    assert cache.lookup(model=MODEL, prompt="Q", task_type=task_type) is not None
    clock.now = T0 + ttl
    assert cache.lookup(model=MODEL, prompt="Q", task_type=task_type) is None


def test_creative_answers_are_never_cached(cache: ResponseCache) -> None:
    assert cache.store("a poem", model=MODEL, prompt="Write a poem", task_type="creative") is None
    assert len(cache) == 0
    assert cache.lookup(model=MODEL, prompt="Write a poem", task_type="creative") is None


def test_lru_bound_evicts_least_recently_used_also_from_the_database(
        engine: Engine, embedder: MiniLMEmbedder) -> None:
    cache = ResponseCache(engine, embedder=embedder, maxsize=2, semantic=False)
    cache.store("1", model=MODEL, prompt="one")
    cache.store("2", model=MODEL, prompt="two")
    assert cache.lookup(model=MODEL, prompt="one") is not None  # "two" is now the oldest
    cache.store("3", model=MODEL, prompt="three")
    assert len(cache) == 2
    assert cache.lookup(model=MODEL, prompt="two") is None
    reloaded = ResponseCache(engine, embedder=embedder, maxsize=10, semantic=False)
    assert {e for e in ("one", "two", "three")
            if reloaded.lookup(model=MODEL, prompt=e, record=False)} == {"one", "three"}


def test_invalidate_by_namespace_model_and_pattern(cache: ResponseCache) -> None:
    cache.store("a", model=MODEL, prompt="weather in Oslo", namespace="n1")
    cache.store("b", model=MODEL, prompt="weather in Rome", namespace="n2")
    cache.store("c", model="gpt-4o", prompt="stock price of ACME", namespace="n2")
    cache.store("d", model=MODEL, prompt="stock price of ACME", namespace="n2")
    assert cache.invalidate(pattern="weather*") == 2
    assert cache.invalidate(model="gpt-4o") == 1
    assert cache.lookup(model=MODEL, prompt="stock price of ACME", namespace="n2") is not None
    assert cache.invalidate(namespace="n2") == 1
    assert len(cache) == 0
    with pytest.raises(ConfigurationError):
        cache.invalidate()


# -- persistence and processes ---------------------------------------------------------------
def test_entries_survive_restart_and_are_shared(tmp_path: Path, clock: Clock,
                                                embedder: MiniLMEmbedder) -> None:
    _survive_and_share(str(tmp_path / "shared.db"), clock, embedder)


def test_entries_survive_restart_and_are_shared_on_postgres(pg_url: str, clock: Clock,
                                                            embedder: MiniLMEmbedder) -> None:
    _survive_and_share(pg_url, clock, embedder)


def _survive_and_share(db: str, clock: Clock, embedder: MiniLMEmbedder) -> None:
    with Engine(db, clock=clock) as first, Engine(db, clock=clock) as second:
        writer = ResponseCache(first, embedder=embedder, sync_interval=0.0)
        reader = ResponseCache(second, embedder=embedder, sync_interval=0.0)
        writer.store("Paris", model=MODEL, prompt="What is the capital of France?",
                     task_type="factual_qa")
        hit = reader.lookup(model=MODEL, prompt="Which city is the capital of France?")
        assert hit is not None and hit.value == "Paris"  # picked up from the database
        writer.invalidate(namespace="default")
        assert reader.lookup(model=MODEL, prompt="What is the capital of France?") is None
        writer.store("Rome", model=MODEL, prompt="What is the capital of Italy?")
    with Engine(db, clock=clock) as restarted:
        cache = ResponseCache(restarted, embedder=embedder)
        assert len(cache) == 1
        hit = cache.lookup(model=MODEL, prompt="Which city is the capital of Italy?")
        assert hit is not None and hit.value == "Rome" and hit.kind == "semantic"


# -- ledger and statistics ---------------------------------------------------------------
def test_hits_are_recorded_as_cached_rows_with_the_saving(engine: Engine,
                                                          cache: ResponseCache) -> None:
    cache.store("Paris", model=MODEL, prompt="What is the capital of France?",
                input_tokens=1000, output_tokens=500, namespace="acme")
    original = engine.catalog.get(MODEL).cost_nanos(1000, 500)
    assert cache.lookup(model=MODEL, prompt="What is the capital of France?",
                        namespace="acme", user_id="u1") is not None
    assert cache.lookup(model=MODEL, prompt="Something else entirely", namespace="acme") is None
    rows = engine.usage(status="cached")
    assert len(rows) == 1
    row = rows[0]
    assert (row.cost_nanos, row.saved_nanos, row.user_id) == (0, original, "u1")
    assert row.metadata_["cache"] == "exact"
    stats = cache.stats("acme")
    assert (stats.hits, stats.misses, stats.saved_nanos) == (1, 1, original)
    assert stats.hit_rate == 0.5
    assert cache.stats("other").hits == 0


def test_decorator_caches_sync_and_async_functions(engine: Engine) -> None:
    import asyncio

    calls: list[str] = []

    @engine.cached(MODEL, task_type="factual_qa")
    def answer(question: str, style: str = "short") -> str:
        calls.append(question)
        return f"answer to {question}"

    assert answer("What is 2+2?") == answer("What is 2+2?")
    assert answer("What is 2+2?", style="long") == "answer to What is 2+2?"
    assert len(calls) == 2

    @engine.cached(MODEL)
    async def aanswer(question: str) -> str:
        calls.append(question)
        return question.upper()

    assert asyncio.run(aanswer("hi")) == asyncio.run(aanswer("hi")) == "HI"
    assert len(calls) == 3
    assert engine.response_cache().stats().hits == 2


def test_bad_input_is_a_typed_error_and_changes_nothing(cache: ResponseCache) -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        cache.lookup(model=MODEL)
    with pytest.raises(ConfigurationError, match="model"):
        cache.store("x", model="", prompt="p")
    with pytest.raises(ConfigurationError, match="JSON"):
        cache.store(object(), model=MODEL, prompt="p")
    with pytest.raises(ConfigurationError, match="messages\\[0\\]"):
        cache.store("x", model=MODEL, messages=["hello"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="cost_nanos"):
        cache.store("x", model=MODEL, prompt="p", cost_nanos=-1)
    with pytest.raises(ConfigurationError, match="threshold"):
        ResponseCache(cache.engine, threshold=1.5)
    assert len(cache) == 0


def test_threads_share_one_cache_safely(cache: ResponseCache) -> None:
    from concurrent.futures import ThreadPoolExecutor

    questions = [f"What is {n} plus {n}?" for n in range(20)]

    def work(question: str) -> bool:
        if cache.lookup(model=MODEL, prompt=question, record=False) is None:
            cache.store(question.upper(), model=MODEL, prompt=question)
        hit = cache.lookup(model=MODEL, prompt=question, record=False)
        return hit is not None and hit.value == question.upper()

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, questions * 3))
    assert len(cache) == 20  # the guard kept "1 plus 1" and "2 plus 2" apart


async def test_async_lookup_and_store(cache: ResponseCache) -> None:
    await cache.astore("Paris", model=MODEL, prompt="What is the capital of France?")
    hit = await cache.alookup(model=MODEL, prompt="What's the capital of France?")
    assert hit is not None and hit.value == "Paris"
    await cache.aclear()
    assert await cache.alookup(model=MODEL, prompt="What is the capital of France?") is None


def test_invalidation_by_pattern_keeps_the_recency_order(engine: Engine,
                                                         embedder: MiniLMEmbedder) -> None:
    cache = ResponseCache(engine, embedder=embedder, maxsize=3, semantic=False)
    for prompt in ("alpha", "beta", "gamma"):
        cache.store(prompt, model=MODEL, prompt=prompt)
    assert cache.lookup(model=MODEL, prompt="alpha", record=False) is not None
    cache.invalidate(pattern="nothing*")  # reads every entry: must not refresh them
    cache.store("delta", model=MODEL, prompt="delta")  # evicts the least recent: beta
    assert cache.lookup(model=MODEL, prompt="beta", record=False) is None
    assert cache.lookup(model=MODEL, prompt="alpha", record=False) is not None


def test_entries_loaded_at_start_expire_and_match_patterns(tmp_path: Path, clock: Clock,
                                                           embedder: MiniLMEmbedder) -> None:
    db = tmp_path / "restart.db"
    with Engine(db, clock=clock) as engine:
        cache = ResponseCache(engine, embedder=embedder)
        cache.store("x", model=MODEL, prompt="How do I reset my password?",
                    task_type="code_generation")
        cache.store("y", model=MODEL, prompt="What is the weather in Oslo?")
    with Engine(db, clock=clock) as engine:
        cache = ResponseCache(engine, embedder=embedder)
        clock.advance(hours=2)  # past the 1 h lifetime of code_generation answers
        assert cache.lookup(model=MODEL, prompt="How do I reset my password?") is None
        assert cache.lookup(model=MODEL, prompt="How can I reset my password?") is None
        assert cache.invalidate(pattern="*Oslo*") == 1
        assert len(cache) == 0
