"""A router's thresholds follow the app's own recent prompts: ``Router(strong_share=s)`` sends
about ``s`` of them up and the default those that look harder than the app's average prompt,
even when they look nothing like the scorer's training prompts (short chat questions here)."""

from __future__ import annotations

import random
import threading

import pytest

from budgetkit import ConfigurationError, Router
from budgetkit.routing import default_scorer

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"
TIERS = {"cheap": CHEAP, "strong": STRONG}
WORDS = ("what is the best way to make a quick dinner for two with rice beans and some "
         "fresh herbs from the garden tonight").split()


def chat_prompts(n: int, seed: int = 0) -> list[str]:
    """Short questions of 3 to 20 words: far shorter than GSM8K or MT-Bench prompts."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 20))) + "?" for _ in range(n)]


def share_up(router: Router, prompts: list[str]) -> float:
    return sum(router.route(p).model == STRONG for p in prompts) / len(prompts)


def test_share_holds_on_traffic_unlike_the_training_prompts() -> None:
    prompts = chat_prompts(1100)
    # What the training prompts' quantiles alone would do with these prompts:
    fixed = Router(TIERS, thresholds=(0.0, default_scorer().threshold_for_share(0.3)))
    assert share_up(fixed, prompts[100:]) < 0.1
    router = Router(TIERS, strong_share=0.3)
    share_up(router, prompts[:100])  # warm-up: the training quantiles still decide
    assert router.share_tracker is not None and router.share_tracker.adapted
    assert share_up(router, prompts[100:]) == pytest.approx(0.3, abs=0.05)


def test_thresholds_follow_the_recent_window_only() -> None:
    router = Router(TIERS, strong_share=0.5, share_window=200, share_warmup=50)
    before = router.thresholds
    short = [f"hi {i}" for i in range(200)]
    long = [("word " * (40 + i % 30)).strip() for i in range(200)]
    share_up(router, short)
    after_short = router.thresholds
    assert after_short != before
    share_up(router, long)
    # the window now holds only long prompts: half of a new batch of them goes up again
    assert share_up(router, long) == pytest.approx(0.5, abs=0.1)
    assert router.thresholds[1] > after_short[1]


def test_a_tie_is_kept_whole_on_the_nearer_side() -> None:
    same = ["the same question?"] * 150
    lower = Router(TIERS, strong_share=0.3, share_warmup=20)
    share_up(lower, same[:20])
    assert share_up(lower, same[20:]) == 0.0  # 0 % is nearer 30 % than 100 %
    higher = Router(TIERS, strong_share=0.7, share_warmup=20)
    share_up(higher, same[:20])
    assert share_up(higher, same[20:]) == 1.0


def test_three_tiers_split_by_share() -> None:
    router = Router({"low": CHEAP, "medium": "gpt-4.1-mini", "high": STRONG},
                    strong_share=0.2, medium_share=0.3)
    prompts = chat_prompts(1100, seed=1)
    for p in prompts[:100]:
        router.route(p)
    tiers = [router.route(p).tier for p in prompts[100:]]
    assert tiers.count("high") / 1000 == pytest.approx(0.2, abs=0.05)
    assert tiers.count("medium") / 1000 == pytest.approx(0.3, abs=0.05)


def test_a_new_scorer_starts_a_new_window() -> None:
    router = Router(TIERS, strong_share=0.3)
    share_up(router, chat_prompts(150))
    assert router.share_tracker is not None and router.share_tracker.seen == 150
    router.fit(["integrate x^2 from 0 to 3", "name a cafe"], [True, False])
    assert router.share_tracker.seen == 0 and not router.share_tracker.adapted
    assert router.thresholds == router.complexity_thresholds


def test_the_default_sends_prompts_harder_than_the_apps_average_up() -> None:
    prompts = chat_prompts(1100, seed=2)
    fixed = Router(TIERS, share_window=0)  # the training prompts' average risk, fixed
    assert fixed.share_tracker is None
    assert share_up(fixed, prompts) == 0.0  # every chat question looks easier than GSM8K
    router = Router(TIERS)
    share_up(router, prompts[:100])
    assert "from the last 101 prompts" in router.route(prompts[0]).reason
    assert "from the last 102 prompts" in router.route(prompts[1]).reason
    assert 0.25 < share_up(router, prompts[100:]) < 0.75
    medium, high = router.thresholds
    assert high < fixed.thresholds[1]  # below the training prompts' average risk
    same = Router(TIERS, share_warmup=10)
    assert share_up(same, ["the same question?"] * 50) == 0.0  # none harder than the rest


def test_calibrate_and_explicit_thresholds_are_fixed() -> None:
    router = Router(TIERS, strong_share=0.3)
    router.calibrate(chat_prompts(100), high_share=0.1)
    assert router.share_tracker is None
    assert Router(TIERS, thresholds=(0.2, 0.4)).share_tracker is None


def test_concurrent_routes_are_all_counted() -> None:
    router = Router(TIERS, strong_share=0.3, share_window=5000)
    prompts = chat_prompts(400)

    def work() -> None:
        for p in prompts:
            router.route(p)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert router.share_tracker is not None and router.share_tracker.seen == 1600


@pytest.mark.parametrize("kwargs, match", [
    ({"share_window": -1}, "share_window"),
    ({"share_window": 10, "share_warmup": 11}, "share_warmup"),
    ({"share_warmup": 0}, "share_warmup"),
    ({"share_window": 1.5}, "share_window"),
])
def test_bad_window_settings_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Router(TIERS, strong_share=0.3, **kwargs)  # type: ignore[arg-type]
