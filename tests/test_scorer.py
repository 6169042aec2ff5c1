"""Router scorer: stable features, the shipped weights, fit, serialisation, typed errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import resources

import pytest

from budgetkit import ConfigurationError, Router
from budgetkit.routing import PromptFeatures, Scorer, default_scorer, prompt_features

ORDINARY = [
    "hi", "What is the capital of France?", "Translate 'good morning' into Spanish.",
    "Write a haiku about autumn leaves.",
    "Summarise this paragraph in one sentence: the meeting moved to Tuesday because two of "
    "the speakers were travelling, and the room was booked for the whole afternoon.",
    "How many minutes are there in a week?",
    "Explain the difference between a list and a tuple in Python, with an example of each.",
    "Draft a short, polite email to a landlord asking when the heating will be repaired; "
    "mention that it has been broken for ten days and that the flat is cold at night.",
    "Give me three ideas for a birthday party for a seven-year-old who likes dinosaurs.",
    "A train leaves at 9:40 and arrives at 13:05. It stops twice for 7 minutes. How long "
    "does it spend moving? Show your steps.",
    "Is a tomato a fruit or a vegetable?",
    "Write a Python function that returns the n-th Fibonacci number iteratively.\n"
    "```python\ndef fib(n):\n    ...\n```",
    "Compare the economic policies of two fictional countries: one taxes land, the other "
    "income. Discuss effects on housing prices, investment and inequality over ten years, "
    "and say which assumptions matter most.",
    "List the planets of the solar system in order from the sun.",
    "What does HTTP status 418 mean?",
    "Tell me a joke about databases.",
    "Rewrite this sentence to be more formal: we gotta ship this by friday or we're toast.",
    "Plan a three-day trip to Lisbon for someone who loves food and old trams, with a "
    "budget of 600 euros, and say what to book in advance.",
    "Why is the sky blue?",
    "Convert 72 degrees Fahrenheit to Celsius.",
    # tasks with their material, as applications send them
    "Summarise the customer's complaint below in two sentences and suggest a reply.\n\n"
    "I ordered the blue jacket in size M on the 3rd. It arrived on the 12th in size L, the "
    "wrong colour, and with a torn pocket. I returned it the same day with the prepaid label "
    "but I have not had a refund or any message since. This is the second time this year.",
    "Review this function and point out bugs:\n```python\ndef mean(xs):\n    total = 0\n"
    "    for x in xs:\n        total += x\n    return total / len(xs)\n```\nWhat happens "
    "for an empty list, and how would you change the signature to make that explicit?",
    "A shop sells pencils at 3 for $1.20 and erasers at $0.45 each. Maria buys 18 pencils "
    "and 4 erasers, pays with a $20 note and gets a 10% discount on the pencils only. How much "
    "change does she get? Explain each step.",
    "Using the meeting notes below, write the list of action items with an owner and a date "
    "for each.\nNotes: Ana will draft the budget by Friday. Ben to call the venue about "
    "catering (before the 14th). We agreed the launch moves to May 2; Carla updates the "
    "website. Open question: who books the photographer?",
    "Translate into French, keeping the formal tone: 'Dear Ms Martin, thank you for your "
    "letter of 4 March. We regret that the delivery was delayed and will refund the shipping "
    "costs. Please find the corrected invoice attached.'",
]


def test_features_are_stable_across_processes_and_hash_seeds() -> None:
    text = "Janet has 3 apples and buys 12 more. How many apples?"
    here = prompt_features(text).to_dict()
    code = ("import json; from budgetkit.routing import prompt_features; "
            f"print(json.dumps(prompt_features({text!r}).to_dict()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                      capture_output=True, text=True).stdout)
    assert there == json.loads(json.dumps(here))
    assert here["i"] and len(here["d"]) == 15


def test_numbers_share_features_and_length_is_left_to_dense_signals() -> None:
    a, b = prompt_features("Tom has 12 apples"), prompt_features("Tom has 37 apples")
    assert (a.index, a.value) == (b.index, b.value)
    short, long = prompt_features("word"), prompt_features("word " * 50)
    assert abs(sum(v * v for v in long.value) - 1.0) < 1e-9  # L2-normalised
    assert long.dense[0] > short.dense[0]


def test_shipped_scorer_is_small_valid_package_data() -> None:
    path = resources.files("budgetkit.routing").joinpath("data/router_scorer.json")
    assert len(path.read_bytes()) < 500_000
    scorer = default_scorer()
    assert scorer.threshold == pytest.approx(0.348, abs=0.001)  # the pooled failure rate
    assert scorer.info["trained_on"] == ["GSM8K (1307)", "MT-Bench (144)"]


def test_shipped_scorer_scores_probabilities_that_grow_with_length() -> None:
    scorer = default_scorer()
    scores = [scorer.score("word " * n) for n in (1, 10, 100, 1000)]
    assert all(0.0 < s < 1.0 for s in scores)
    assert scores == sorted(scores) and scores[0] < scores[-1]


def test_default_threshold_sends_a_sensible_share_of_ordinary_prompts_up() -> None:
    router = Router({"cheap": "gpt-4o-mini", "strong": "gpt-4o"})
    up = [router.route(p).model == "gpt-4o" for p in ORDINARY]
    assert 0.05 <= sum(up) / len(up) <= 0.80
    assert not up[0] and up[21]  # "hi" stays cheap, the long review task goes up


def test_threshold_for_share_follows_the_training_distribution() -> None:
    scorer = default_scorer()
    assert scorer.threshold_for_share(0.0) == 1.0
    t10, t30, t90 = (scorer.threshold_for_share(s) for s in (0.1, 0.3, 0.9))
    assert t90 < t30 < t10
    assert t90 < scorer.threshold < t10
    with pytest.raises(ConfigurationError, match="strong_share"):
        scorer.threshold_for_share(1.5)


def _topic_data() -> tuple[list[str], list[bool]]:
    # Same lengths, different topics: only the words tell which prompts the cheap model fails.
    prompts, failed = [], []
    for i in range(40):
        prompts.append(f"Compute the definite integral of x^{i % 7 + 2} from 0 to {i + 1}, exactly.")
        failed.append(True)
        prompts.append(f"Suggest a friendly name for a cafe on street number {i + 1}, please.")
        failed.append(False)
    return prompts, failed


def test_fit_learns_what_length_cannot_see() -> None:
    prompts, failed = _topic_data()
    shipped = default_scorer()
    fitted = shipped.fit(prompts, failed)
    maths = "Compute the definite integral of x^3 from 0 to 99, exactly."
    cafe = "Suggest a friendly name for a cafe on street number 99, please."
    assert abs(shipped.score(maths) - shipped.score(cafe)) < 0.02
    assert fitted.score(maths) > 0.6 > 0.4 > fitted.score(cafe)
    assert fitted.n_outcomes == len(prompts)
    # learnable from stored features alone: the same scorer as from the texts
    from_features = shipped.fit_features([prompt_features(p) for p in prompts], failed)
    assert from_features.score(maths) == pytest.approx(fitted.score(maths))


def test_fit_is_pulled_toward_the_prior_when_outcomes_are_few() -> None:
    prompts, failed = _topic_data()
    few = default_scorer().fit(prompts[:4], failed[:4])
    many = default_scorer().fit(prompts, failed)
    maths = "Compute the definite integral of x^5 from 0 to 7, exactly."
    assert default_scorer().score(maths) < few.score(maths) < many.score(maths)


def test_fitted_threshold_keeps_the_share_and_can_be_set() -> None:
    prompts, failed = _topic_data()
    fitted = default_scorer().fit(prompts, failed, strong_share=0.5)
    up = [fitted.score(p) >= fitted.threshold for p in prompts]
    assert up == failed  # half go up, and they are the right half


def test_serialisation_round_trip_scores_the_same() -> None:
    prompts, failed = _topic_data()
    fitted = default_scorer().fit(prompts, failed)
    again = Scorer.from_json(fitted.to_json())
    for text in ORDINARY + prompts[:5]:
        assert again.score(text) == pytest.approx(fitted.score(text), abs=1e-6)
    assert again.threshold == fitted.threshold


@pytest.mark.parametrize("change, match", [
    ({"format": "other/1"}, "format"),
    ({"features": ["log_chars"]}, "other dense features"),
    ({"mean": [0.0]}, "15 dense"),
    ({"quantiles": [0.5] * 3}, "101 ascending"),
    ({"threshold": 2.0}, "threshold"),
    ({"hashed_index": [1 << 20], "hashed_weight": [0.1]}, "out of range"),
    ({"bias": "x"}, "malformed"),
])
def test_malformed_scorer_is_a_typed_error(change, match) -> None:
    data = {**default_scorer().to_dict(), **change}
    with pytest.raises(ConfigurationError, match=match):
        Scorer.from_dict(data)


def test_not_json_is_a_typed_error() -> None:
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        Scorer.from_json("{nope")


@pytest.mark.parametrize("prompts, labels, match", [
    (["a", "b"], [True], "same length"),
    ([], [], "one or more"),
    (["a"], [1], "booleans"),
    ("ab", [True, False], "list of prompts"),
])
def test_bad_fit_input_is_a_typed_error(prompts, labels, match) -> None:
    with pytest.raises(ConfigurationError, match=match):
        default_scorer().fit(prompts, labels)


def test_features_from_another_hash_space_are_refused() -> None:
    other = prompt_features("hello there", bits=10)
    with pytest.raises(ConfigurationError, match="10 bits"):
        default_scorer().fit_features([other], [True])
    with pytest.raises(ConfigurationError, match="malformed"):
        PromptFeatures.from_dict({"d": [1.0]})


def test_route_with_the_learned_scorer_is_fast() -> None:
    router = Router({"cheap": "gpt-4o-mini", "strong": "gpt-4o"})
    prompt = ORDINARY[12] * 3
    router.route(prompt)  # warm the tokenizer
    timings = []
    for _ in range(50):
        started = time.perf_counter()
        router.route(prompt)
        timings.append(time.perf_counter() - started)
    assert sorted(timings)[len(timings) // 2] < 0.005  # the 5 ms p50 budget
