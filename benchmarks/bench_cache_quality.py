"""How often the semantic cache serves a same-meaning question, and how often a wrong answer.

    pip install -r benchmarks/requirements-cache.txt   # GPTCache (its default evaluation),
                                                        # fow-cache (600 independent pairs)
    python benchmarks/bench_cache_quality.py [--quiet]

Every system gets the same vectors (all-MiniLM-L6-v2 int8, the default embedder):

* **budgetkit**: ``ResponseCache`` at its defaults (second stage on, threshold 0.85);
* **plain cosine**: the nearest stored question served at cosine >= 0.85 (no second stage);
* **GPTCache default**: its default ``SearchDistanceEvaluation`` (max_distance 4.0) at its
  default ``similarity_threshold`` 0.8, decided by GPTCache's own objects: a hit needs
  ``4 - d2 >= 3.2``, i.e. squared L2 distance d2 <= 0.8, a cosine >= 0.6.

Single-turn pairs, all written apart from budgetkit's tuning (``data/cache-pairs/README.md``
says which file chose what): ``heldout.jsonl`` (110), ``test.jsonl`` (74), and, when the
``fow-cache`` package is installed, its 600 pairs written independently of the project
(CC BY 4.0). Each pair is run **isolated** (the cache holds the cached question only) and
**populated** (it also holds the 1,960 distinct GPTCache mock questions, origins and
paraphrases, as unrelated entries). A same-meaning pair is *served* when the lookup returns
its answer; a *wrong answer* is a look-alike served anything (except an entry that is the
very question asked), or a same-meaning pair served another question's answer. The GPTCache mock pairs (999 paraphrases) are measured the same way.
The pairs that chose rules and cosines (``dev.jsonl``, ``tuning.jsonl``) get one line, marked.

Conversations: the shared multi-turn pairs (rules tuned on billing; retail + services held
out) and budgetkit's own follow-up traps (``conversations.jsonl``: dev chose the rules,
test only measured), for budgetkit's default, budgetkit with every earlier turn in the
key, and GPTCache's default pre-processing (the last message only).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from budgetkit import Engine  # noqa: E402
from budgetkit.cache import _cache as cache_module  # noqa: E402
from budgetkit.cache import MiniLMEmbedder, ResponseCache  # noqa: E402
from budgetkit.cache._text import embedding_text  # noqa: E402

PAIRS = ROOT / "benchmarks" / "data" / "cache-pairs"
SHARED = ROOT.parent / "shared" / "data" / "cache-eval"
MODEL = "gpt-4o-mini"
PLAIN_THRESHOLD = 0.85
Pair = dict[str, Any]
QUIET = False


def say(text: str) -> None:
    if not QUIET:
        print(f"  .. {text}", file=sys.stderr, flush=True)


def load_jsonl(path: Path) -> list[Pair]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fow_pairs() -> list[Pair]:
    """fow-cache's 600 single-turn pairs, or [] when the package is not installed."""
    spec = importlib.util.find_spec("fow_cache")
    if spec is None or spec.origin is None:
        return []
    path = Path(spec.origin).parent / "data" / "pairs.jsonl"
    return [dict(row, kind=f"{row['category']} ({row['style']})") for row in load_jsonl(path)]


class VectorBook:
    """Every text embedded once; every system reads the same vectors."""

    name = "all-MiniLM-L6-v2-onnx-int8"

    def __init__(self, saved: Path | None = None) -> None:
        self.model = MiniLMEmbedder()
        self.vectors: dict[str, np.ndarray] = {}
        self.saved = saved
        if saved is not None and saved.exists():
            with np.load(saved) as data:
                self.vectors = dict(zip(json.loads(str(data["texts"])), data["vectors"]))

    def save(self) -> None:
        if self.saved is not None and self.vectors:
            texts = list(self.vectors)
            np.savez(self.saved, texts=json.dumps(texts),
                     vectors=np.stack([self.vectors[t] for t in texts]))

    def add(self, texts: list[str]) -> None:
        missing = sorted({t for t in texts if t not in self.vectors})
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            self.vectors.update(zip(chunk, self.model(chunk)))
            say(f"embedded {min(start + 256, len(missing))}/{len(missing)} texts")

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.add(list(texts))
        return np.stack([self.vectors[text] for text in texts])


# -- the three systems -------------------------------------------------------------------
# Each takes (cached questions per run, asked question per run) and returns, per asked
# question, the cached question whose answer it serves (or None).
Runs = list[tuple[list[str], str]]


def gptcache_rule() -> tuple[str, Callable[[float], bool]]:
    """GPTCache's default decision, from its own objects when it is installed."""
    try:
        from gptcache.config import Config
        from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation
    except ImportError:
        return "GPTCache default (rule: d2 <= 0.8; gptcache not installed)", lambda d2: d2 <= 0.8
    evaluation, threshold = SearchDistanceEvaluation(), Config().similarity_threshold
    low, high = evaluation.range()
    rank_threshold = (high - low) * threshold + low

    def hit(d2: float) -> bool:
        return bool(evaluation.evaluation({}, {"search_result": (d2, None)}) >= rank_threshold)
    return "GPTCache default", hit


def nearest(book: VectorBook, runs: Runs, accept: Callable[[float], bool]) -> list[str | None]:
    served: list[str | None] = []
    for cached, asked in runs:
        matrix, query = book(cached), book([asked])[0]
        cosines = matrix @ query
        best = int(np.argmax(cosines))
        served.append(cached[best] if accept(float(cosines[best])) else None)
    return served


def run_budgetkit(book: VectorBook, base: list[str], pairs: list[Pair],
                  workdir: Path) -> list[str | None]:
    """One cache at its defaults holding ``base``; per pair its cached question is stored,
    the new one looked up, and the cached one removed again (unless it is in ``base``)."""
    with Engine(workdir / f"bk-{time.monotonic_ns()}.db") as engine:
        cache = ResponseCache(engine, embedder=book, record_hits=False, sync_interval=1e9,
                              vector_backend="local")
        for question in base:
            cache.store(question, model=MODEL, prompt=question, cost_nanos=0,
                        input_tokens=0, output_tokens=0)
        kept = set(base)
        served: list[str | None] = []
        for number, pair in enumerate(pairs):
            cache.store(pair["a"], model=MODEL, prompt=pair["a"], cost_nanos=0,
                        input_tokens=0, output_tokens=0)
            hit = cache.lookup(model=MODEL, prompt=pair["b"])
            served.append(hit.value if hit is not None else None)
            if pair["a"] not in kept:
                cache.invalidate(namespace="default", pattern=glob.escape(pair["a"]))
            if number % 100 == 99:
                say(f"budgetkit: {number + 1}/{len(pairs)} lookups")
    return served


@contextmanager
def timed_verifier() -> Iterator[list[float]]:
    """Seconds spent in the second stage, per call (patched around the cache's verify)."""
    spent: list[float] = []
    original = cache_module.verify

    def verify(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)
    cache_module.verify = verify  # type: ignore[assignment]
    try:
        yield spent
    finally:
        cache_module.verify = original  # type: ignore[assignment]


# -- scoring -----------------------------------------------------------------------------
def score(pairs: list[Pair], served: list[str | None]) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for pair, got in zip(pairs, served):
        kind = pair["kind"] if pair["same_answer"] else f"{pair['kind']} (look-alike)"
        counts[(kind, "n")] += 1
        counts[("same" if pair["same_answer"] else "trap", "n")] += 1
        if got is None:
            continue
        if (pair["same_answer"] and got == pair["a"]) or _same_text(got, pair["b"]):
            counts[(kind, "right")] += 1
            counts[("same", "right")] += 1
        else:
            counts[(kind, "wrong")] += 1
            counts[("same" if pair["same_answer"] else "trap", "wrong")] += 1
    return counts


def _same_text(x: str, y: str) -> bool:
    """The very question asked (a distractor can be it): serving its answer is right."""
    return " ".join(x.casefold().split()).rstrip("?.! ") == \
        " ".join(y.casefold().split()).rstrip("?.! ")


def share(counts: Counter[tuple[str, str]], kind: str, what: str) -> str:
    total = counts[(kind, "n")]
    return f"{100.0 * counts[(kind, what)] / total:.1f} %" if total else "-"


def single_turn(name: str, pairs: list[Pair], book: VectorBook, distractors: list[str],
                workdir: Path, gpt: tuple[str, Callable[[float], bool]],
                per_kind: bool = True) -> dict[str, Any]:
    say(f"{name}: {len(pairs)} pairs")
    label, gpt_hit = gpt
    results: dict[str, Counter[tuple[str, str]]] = {}
    for mode, base in (("isolated", []), ("populated", distractors)):
        runs: Runs = [(base + [p["a"]] if p["a"] not in base else base, p["b"]) for p in pairs]
        with timed_verifier() as spent:
            started = time.perf_counter()
            served = run_budgetkit(book, base, pairs, workdir)
            lookups = time.perf_counter() - started
        results[f"budgetkit|{mode}"] = score(pairs, served)
        results[f"plain cosine {PLAIN_THRESHOLD}|{mode}"] = score(
            pairs, nearest(book, runs, lambda c: c >= PLAIN_THRESHOLD))
        results[f"{label}|{mode}"] = score(pairs, nearest(book, runs, lambda c: gpt_hit(2 - 2 * c)))
        if mode == "populated":
            second_stage = 1000 * sum(spent) / len(runs)
            say(f"{name}: second stage {second_stage:.2f} ms per lookup, "
                f"{len(base) + 1} entries, {1000 * lookups / len(runs):.1f} ms per pair")
    columns = list(results)
    print(f"\n### {name} ({sum(p['same_answer'] for p in pairs)} same-meaning, "
          f"{sum(not p['same_answer'] for p in pairs)} look-alikes; populated: "
          f"{len(distractors) + 1} entries)\n")
    print("| kind | " + " | ".join(c.replace("|", ", ") for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    kinds = sorted({k for c in results.values() for k, what in c if what == "n"
                    and k not in ("same", "trap")}, key=lambda k: ("look-alike" in k, k))
    rows = [("**same-meaning served**", "same", "right"),
            ("**wrong answers, look-alikes**", "trap", "wrong"),
            ("wrong answers, same-meaning", "same", "wrong")]
    if per_kind:
        rows += [(f"{k}: {'served' if 'look-alike' not in k else 'wrong'}", k,
                  "wrong" if "look-alike" in k else "right") for k in kinds]
    for title, kind, what in rows:
        if any(c[(kind, "n")] for c in results.values()):
            print(f"| {title} | " + " | ".join(share(results[c], kind, what) for c in columns)
                  + " |")
    return results


# -- conversations -------------------------------------------------------------------------
def conversations(name: str, pairs: list[Pair], book: VectorBook, workdir: Path,
                  gpt: tuple[str, Callable[[float], bool]]) -> list[str]:
    """One table row per system: should-hit served, traps served."""
    rows = []
    label, gpt_hit = gpt
    for system, options in (("budgetkit default", {}),
                            ("budgetkit, every earlier turn in the key",
                             {"standalone_turns": False})):
        with Engine(workdir / f"conv-{time.monotonic_ns()}.db") as engine:
            cache = ResponseCache(engine, embedder=book, record_hits=False, sync_interval=1e9,
                                  vector_backend="local", **options)
            served = []
            for number, pair in enumerate(pairs):
                namespace = f"pair-{number}"
                cache.store(pair["id"], model=MODEL, messages=pair["a"], namespace=namespace)
                hit = cache.lookup(model=MODEL, messages=pair["b"], namespace=namespace)
                served.append(hit is not None and hit.value == pair["id"])
        rows.append((system, served))
    last = [(p["a"][-1]["content"], p["b"][-1]["content"]) for p in pairs]
    rows.append((f"{label} (last message)",
                 [gpt_hit(2 - 2 * float(book([a])[0] @ book([b])[0])) for a, b in last]))
    lines = []
    hits = sum(p["same_answer"] for p in pairs)
    for system, served in rows:
        right = sum(s for s, p in zip(served, pairs) if p["same_answer"])
        traps = sum(s for s, p in zip(served, pairs) if not p["same_answer"])
        lines.append(f"| {name} | {system} | {right}/{hits} | {traps}/{len(pairs) - hits} |")
    say(f"conversations {name}: done")
    return lines


def main() -> None:
    global QUIET
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--vectors", type=Path, help="keep the embedded texts in this .npz "
                        "file and reuse them next time (same model, same vectors)")
    args = parser.parse_args()
    QUIET = args.quiet
    tuned = load_jsonl(PAIRS / "tuning.jsonl") + load_jsonl(PAIRS / "dev.jsonl")
    sets = [("held-out pairs (heldout.jsonl)", load_jsonl(PAIRS / "heldout.jsonl")),
            ("test pairs (test.jsonl)", load_jsonl(PAIRS / "test.jsonl"))]
    independent = fow_pairs()
    if independent:
        sets.append(("fow-cache 0.1.0 pairs (written independently)", independent))
    mock_rows = json.loads((SHARED / "gptcache_mock_data.json").read_text())
    mock = [{"kind": "paraphrase", "same_answer": True, "a": r["origin"], "b": r["similar"]}
            for r in mock_rows]
    # unrelated entries for "populated": every GPTCache mock question, both sides
    distractors = list(dict.fromkeys(q for r in mock_rows for q in (r["origin"], r["similar"])))
    book = VectorBook(args.vectors)
    texts = [p[k] for _, pairs in sets for p in pairs for k in ("a", "b")] + \
        [p[k] for p in tuned + mock for k in ("a", "b")]
    book.add(texts + [embedding_text(t) for t in texts])
    book.save()
    gpt = gptcache_rule()
    workdir = Path(tempfile.mkdtemp(prefix="bench-cache-quality-"))
    print(f"## Single-turn pairs: budgetkit defaults vs plain cosine vs {gpt[0]}, same vectors")
    for name, pairs in sets:
        single_turn(name, pairs, book, distractors, workdir, gpt)
    # populated: every other origin too; many are near-duplicates of each other, so some
    # "wrong answers" there are the same question worded alike (GPTCache's own data)
    single_turn("GPTCache mock pairs (paraphrases only)", mock, book,
                list(dict.fromkeys(r["origin"] for r in mock_rows)), workdir, gpt,
                per_kind=False)
    single_turn("pairs that chose rules and cosines (dev + tuning): not a test figure",
                tuned, book, distractors, workdir, gpt, per_kind=False)

    print("\n## Conversations: should-hit served, traps served\n")
    print("| pairs | system | should-hit served | traps served |\n|---|---|---|---|")
    own = load_jsonl(PAIRS / "conversations.jsonl")
    shared = {path: load_jsonl(path) for path in sorted(SHARED.glob("conv-*/*.jsonl"))}
    for name, pairs in (
            ("shared, retail + services (held out)",
             [p for path, rows in shared.items() if path.name != "billing.jsonl" for p in rows]),
            ("shared, billing (tuned on)",
             [p for path, rows in shared.items() if path.name == "billing.jsonl" for p in rows]),
            ("own follow-ups, test", [p for p in own if p["split"] == "test"]),
            ("own follow-ups, dev (tuned on)", [p for p in own if p["split"] == "dev"])):
        for line in conversations(name, pairs, book, workdir, gpt):
            print(line)
    book.save()


if __name__ == "__main__":
    main()
