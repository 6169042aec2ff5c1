"""How often the semantic cache serves a paraphrase, and how often it serves a wrong answer.

    pip install -r benchmarks/requirements-cache.txt   # GPTCache + faiss, the peer
    python benchmarks/bench_cache_quality.py

Data (all labelled; both systems get the same MiniLM int8 vectors):

* ``data/cache-pairs/tuning.jsonl``: 50 paraphrases + 60 hard negatives (entity, number,
  date, negation, scope). The guard rules and the default threshold were tuned on it.
* ``data/cache-pairs/heldout.jsonl``: 50 + 60 more, other topics, written before the
  guard and never used to tune it: the honest figure.
* ``../shared/data/cache-eval/gptcache_mock_data.json``: GPTCache's own 999 paraphrase
  pairs (all should hit; a hit on another pair's question is a wrong answer).
* ``../shared/data/cache-eval/conv-*``: 240 labelled multi-turn pairs (120 should hit,
  120 traps whose last user message is identical). The conversation rules
  (:func:`budgetkit.cache._keys.is_standalone`) were tuned on the *billing* files only;
  retail + services are held out.

1. Threshold sweep on single-turn pairs (one cached question per pair): served-paraphrase
   and false-hit rates with a plain threshold and with budgetkit's guard.
2. Whole caches at default settings, same vectors: budgetkit vs GPTCache 0.1.44
   (SQLite + faiss, ``SearchDistanceEvaluation``, ``similarity_threshold=0.8``,
   ``get_prompt`` / the last message as key, as its README sets up a similar-search cache).
3. Multi-turn pairs by subtype, tuning (billing) vs held-out (retail + services): budgetkit
   with every earlier turn in the key (``standalone_turns=False``, the behaviour before)
   and with standalone last questions keyed on themselves (the default).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from budgetkit import Engine  # noqa: E402
from budgetkit.cache._cache import DEFAULT_THRESHOLD, ResponseCache  # noqa: E402
from budgetkit.cache._guard import extract_facts, facts_conflict  # noqa: E402
from budgetkit.cache._embedders import MiniLMEmbedder  # noqa: E402

PAIRS = ROOT / "benchmarks" / "data" / "cache-pairs"
SHARED = ROOT.parent / "shared" / "data" / "cache-eval"
MODEL = "gpt-4o-mini"


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class VectorBook:
    """Every text embedded once; both systems read the same vectors."""

    def __init__(self) -> None:
        self.model = MiniLMEmbedder()
        self.vectors: dict[str, np.ndarray] = {}

    def add(self, texts: list[str]) -> None:
        missing = sorted({t for t in texts if t not in self.vectors})
        if missing:
            for text, vector in zip(missing, self.model(missing)):
                self.vectors[text] = vector

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.add(list(texts))
        return np.stack([self.vectors[text] for text in texts])

    name = "all-MiniLM-L6-v2-onnx-int8"


def sweep(pairs: list[dict[str, Any]], book: VectorBook,
          thresholds: list[float]) -> list[tuple[float, float, float, float, float]]:
    cosines = np.array([float(book.vectors[p["a"]] @ book.vectors[p["b"]]) for p in pairs])
    refused = np.array([facts_conflict(extract_facts(p["a"]), extract_facts(p["b"])) is not None
                        for p in pairs])
    positive = np.array([p["same_answer"] for p in pairs])
    rows = []
    for threshold in thresholds:
        above = cosines >= threshold
        rows.append((threshold, above[positive].mean(), above[~positive].mean(),
                     (above & ~refused)[positive].mean(), (above & ~refused)[~positive].mean()))
    return rows


def auc(pairs: list[dict[str, Any]], book: VectorBook) -> float:
    pos = [float(book.vectors[p["a"]] @ book.vectors[p["b"]]) for p in pairs if p["same_answer"]]
    neg = [float(book.vectors[p["a"]] @ book.vectors[p["b"]])
           for p in pairs if not p["same_answer"]]
    return float(np.mean([[1.0 if x > y else 0.5 if x == y else 0.0 for y in neg] for x in pos]))


# -- whole-cache runs ------------------------------------------------------------------------
Case = tuple[Any, Any, str, bool]  # (cached key, asked key, answer id, should hit)


def single_cases(pairs: list[dict[str, Any]]) -> list[Case]:
    return [(p["a"], p["b"], p["a"], p["same_answer"]) for p in pairs]


def mock_cases(rows: list[dict[str, str]]) -> list[Case]:
    return [(r["origin"], r["similar"], r["origin"], True) for r in rows]


def conversation_cases(pairs: list[dict[str, Any]]) -> list[Case]:
    return [(p["a"], p["b"], p["id"], p["same_answer"]) for p in pairs]


def score(cases: list[Case], answers: list[Any]) -> tuple[int, int, int, int]:
    """(paraphrases served right, paraphrases, wrong answers served, queries)."""
    served = wrong = 0
    for (_, _, answer, should), got in zip(cases, answers):
        if got is None:
            continue
        if should and got == answer:
            served += 1
        else:
            wrong += 1
    return served, sum(c[3] for c in cases), wrong, len(cases)


def run_budgetkit(cases: list[Case], book: VectorBook, workdir: Path, label: str,
                  **options: Any) -> list[Any]:
    with Engine(workdir / f"bk-{label}.db") as engine:
        cache = ResponseCache(engine, embedder=book, record_hits=False, sync_interval=1e9,
                              **options)
        for cached, _, answer, _ in cases:
            key = {"messages": cached} if isinstance(cached, list) else {"prompt": cached}
            cache.store(answer, model=MODEL, **key, cost_nanos=0, input_tokens=0,
                        output_tokens=0)
        answers = []
        for _, asked, _, _ in cases:
            key = {"messages": asked} if isinstance(asked, list) else {"prompt": asked}
            hit = cache.lookup(model=MODEL, **key)
            answers.append(hit.value if hit is not None else None)
    return answers


def run_gptcache(cases: list[Case], book: VectorBook, workdir: Path, label: str) -> list[Any]:
    from gptcache import Cache
    from gptcache.adapter.api import get, put
    from gptcache.manager import CacheBase, VectorBase, get_data_manager
    from gptcache.processor.pre import get_prompt
    from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

    def text_of(key: Any) -> str:  # GPTCache's chat default keys on the last message
        return key[-1]["content"] if isinstance(key, list) else key

    cache = Cache()
    data_manager = get_data_manager(
        CacheBase("sqlite", sql_url=f"sqlite:///{workdir / f'gpt-{label}.db'}"),
        VectorBase("faiss", dimension=384, index_path=str(workdir / f"gpt-{label}.index")),
        max_size=max(1000, 2 * len(cases)))
    cache.init(pre_embedding_func=get_prompt,
               embedding_func=lambda text, **_: book([text])[0],
               data_manager=data_manager, similarity_evaluation=SearchDistanceEvaluation())
    for cached, _, answer, _ in cases:
        put(text_of(cached), answer, cache_obj=cache)
    return [get(text_of(asked), cache_obj=cache) for _, asked, _, _ in cases]


SUBTYPES = ("same_context_reworded", "irrelevant_history", "same_context_extra_chatter",
            "context_swap", "detail_swap", "intent_flip")


def conversation_table(tuning: list[dict[str, Any]], heldout: list[dict[str, Any]],
                       book: VectorBook, workdir: Path) -> None:
    """Per subtype: pairs served right (should-hit) or served at all (traps)."""
    variants = (("before: whole conversation in the key", {"standalone_turns": False}),
                ("after: standalone last questions (default)", {}))
    counts: dict[tuple[str, str, str], tuple[int, int]] = {}
    for split, pairs in (("tuning", tuning), ("held-out", heldout)):
        cases = conversation_cases(pairs)
        for variant, options in variants:
            answers = run_budgetkit(cases, book, workdir, f"conv-{split}-{len(counts)}",
                                    **options)
            for subtype in SUBTYPES:
                chosen = [i for i, p in enumerate(pairs) if p["subtype"] == subtype]
                right = sum(answers[i] == pairs[i]["id"] for i in chosen)
                served = sum(answers[i] is not None for i in chosen)
                should = pairs[chosen[0]]["same_answer"] if chosen else True
                counts[(split, variant, subtype)] = (right if should else served, len(chosen))
            wrong = sum(a is not None and (not p["same_answer"] or a != p["id"])
                        for a, p in zip(answers, pairs))
            counts[(split, variant, "wrong answers, all pairs")] = (wrong, len(pairs))
    header = [f"{split}: {variant.split(':')[0]}" for split in ("tuning", "held-out")
              for variant, _ in variants]
    print("| subtype (should-hit: served right; trap: served) | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for subtype in (*SUBTYPES, "wrong answers, all pairs"):
        cells = []
        for split in ("tuning", "held-out"):
            for variant, _ in variants:
                got, total = counts[(split, variant, subtype)]
                cells.append(f"{got}/{total}")
        print(f"| {subtype} | " + " | ".join(cells) + " |")
    for split, pairs in (("tuning", tuning), ("held-out", heldout)):
        for variant, _ in variants:
            hits = sum(counts[(split, variant, s)][0] for s in SUBTYPES[:3])
            positives = sum(p["same_answer"] for p in pairs)
            traps = sum(counts[(split, variant, s)][0] for s in SUBTYPES[3:])
            print(f"{split}, {variant}: should-hit served {hits}/{positives} "
                  f"({percent(hits, positives).strip()}), traps served {traps}/"
                  f"{len(pairs) - positives}")


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f} %" if whole else "   -  "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-peer", action="store_true", help="skip GPTCache")
    args = parser.parse_args()
    tuning, heldout = load_jsonl(PAIRS / "tuning.jsonl"), load_jsonl(PAIRS / "heldout.jsonl")
    mock = json.loads((SHARED / "gptcache_mock_data.json").read_text())
    conversations = [row for path in sorted(SHARED.glob("conv-*/*.jsonl"))
                     for row in load_jsonl(path)]
    conv_tuning = [row for path in sorted(SHARED.glob("conv-*/billing.jsonl"))
                   for row in load_jsonl(path)]
    conv_heldout = [row for path in sorted(SHARED.glob("conv-*/*.jsonl"))
                    if path.name != "billing.jsonl" for row in load_jsonl(path)]
    book = VectorBook()
    started = time.perf_counter()
    book.add([p[k] for p in tuning + heldout for k in ("a", "b")]
             + [r[k] for r in mock for k in ("origin", "similar")]
             + [p[k][-1]["content"] for p in conversations for k in ("a", "b")])
    print(f"embedded {len(book.vectors)} texts in {time.perf_counter() - started:.1f} s "
          f"with {book.name}\n")

    thresholds = [0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 0.99]
    print("1. Single-turn pairs, one cached question each: served paraphrases / false hits")
    for name, pairs in (("tuning (guard tuned here)", tuning), ("held-out", heldout)):
        print(f"\n{name}: {sum(p['same_answer'] for p in pairs)} paraphrases, "
              f"{sum(not p['same_answer'] for p in pairs)} hard negatives, "
              f"ROC-AUC of plain cosine {auc(pairs, book):.2f}")
        print("| threshold | plain: served | plain: false hits | guard: served "
              "| guard: false hits |")
        print("|---|---|---|---|---|")
        for threshold, served, false, g_served, g_false in sweep(pairs, book, thresholds):
            mark = " (default)" if abs(threshold - DEFAULT_THRESHOLD) < 1e-9 else ""
            print(f"| {threshold:.2f}{mark} | {served:6.1%} | {false:6.1%} | {g_served:6.1%} "
                  f"| {g_false:6.1%} |")

    print(f"\n2. Whole caches at default settings (budgetkit threshold {DEFAULT_THRESHOLD}, "
          "guard on; GPTCache 0.1.44 defaults), same vectors")
    print("| data | system | paraphrases served | wrong answers served | time per store+lookup |")
    print("|---|---|---|---|---|")
    datasets = (("tuning singles", single_cases(tuning)),
                ("held-out singles", single_cases(heldout)),
                ("GPTCache mock pairs", mock_cases(mock)),
                ("multi-turn (240)", conversation_cases(conversations)))
    systems = [("budgetkit", run_budgetkit)]
    if not args.no_peer:
        try:
            import faiss  # noqa: F401
            import gptcache  # noqa: F401

            systems.append(("GPTCache", run_gptcache))
        except ImportError as exc:
            print(f"(GPTCache not measured: {exc}; "
                  "pip install -r benchmarks/requirements-cache.txt)")
    # not deleted: GPTCache writes its faiss index at interpreter exit
    tmp = tempfile.mkdtemp(prefix="bench-cache-quality-")
    if True:
        for label, cases in datasets:
            for system, run in systems:
                started = time.perf_counter()
                answers = run(cases, book, Path(tmp), f"{system}-{label}".replace(" ", "_"))
                elapsed = time.perf_counter() - started
                served, positives, wrong, total = score(cases, answers)
                print(f"| {label} | {system} | {served}/{positives} ({percent(served, positives)}) "
                      f"| {wrong}/{total} ({percent(wrong, total)}) "
                      f"| {1000 * elapsed / (2 * len(cases)):.2f} ms/op |")
    print("\n3. Multi-turn pairs by subtype; rules tuned on billing, retail + services held out")
    conversation_table(conv_tuning, conv_heldout, book, Path(tmp))
    print("\nGPTCache mock pairs have no negatives: a hit on another pair's question is counted "
          "as wrong,\nbut most such pairs in this file are near-duplicate questions with the "
          "same answer.")


if __name__ == "__main__":
    main()
