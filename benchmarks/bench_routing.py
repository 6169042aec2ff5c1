"""Router and cascade evaluation on real model answers (RouteLLM's GSM8K and MT-Bench data).

Dataset: /work/shared/data/routing-eval/ (override with ``--data``), copied unchanged from
the RouteLLM repository (https://github.com/lm-sys/RouteLLM, commit 0b64fdaf), licensed
Apache-2.0 (licence text alongside the data as LICENSE.RouteLLM-Apache-2.0). Strong model
``gpt-4-1106-preview``, weak model ``mistralai/Mixtral-8x7B-Instruct-v0.1``.

* ``gsm8k/gsm8k_responses.csv``: 1,319 GSM8K test questions with both models' full answer
  text and RouteLLM's correctness flag (last integer equals the gold answer); the 12 prompts
  listed in ``gsm8k/contaminated_prompts.jsonl`` are dropped (1,307 remain).
* ``mt_bench/judgements.jsonl`` + ``question.jsonl``: 80 questions x 2 turns x 2 models, each
  answer scored 1-10 by GPT-4 as judge; the 8 contaminated questions are dropped.

What is measured, with every policy priced from budgetkit's catalog (gpt-4-1106-preview and
mistralai/mixtral-8x7b-instruct-v0.1 entries) and every prompt and answer counted with
budgetkit's token counter (cl100k: exact for GPT-4, an estimate for Mixtral):

* always-cheap and always-strong baselines;
* GSM8K: ``budgetkit.Cascade`` (Mixtral first, GPT-4 when Mixtral's real answer text fails
  the checks), with an Engine recording one usage row per attempt; the cascade pays for
  both calls of an escalated query. Checks are real checks on the text, not the label:
  a final ``#### N`` answer line, every worked equation in the answer recomputes
  correctly, and the final number is one the work computed (self-consistency);
* ``budgetkit.Router`` (two tiers) deciding per query before any call: complexity score
  with the default thresholds, with thresholds calibrated on the prompts themselves
  (``Router.calibrate``, no labels used) to send ``--strong-share`` of them to GPT-4, and
  (MT-Bench) the task type derived from the question category;
* for each policy, the "longest prompts to strong" baseline sending the same fraction of
  queries to GPT-4, and random routing at that fraction (expected value);
* the perfect-check cascade (oracle) as the ceiling.

Run:  python benchmarks/bench_routing.py          (about 10 s)
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from budgetkit import Cascade, Engine, Router, count_message_tokens, count_tokens, default_catalog
from budgetkit.routing import Completion, MatchesRegex

STRONG = "gpt-4-1106-preview"
WEAK = "mistralai/mixtral-8x7b-instruct-v0.1"
CSV_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
DEFAULT_DATA = Path("/work/shared/data/routing-eval")


@dataclass
class Query:
    prompt: str            # what the router sees (the conversation so far)
    cost: dict[str, int]   # model -> nano-dollars of answering this query
    quality: dict[str, float]  # model -> 1/0 correct (GSM8K) or judge score (MT-Bench)
    answer: dict[str, str]
    task_type: str | None = None


def price(model: str, input_tokens: int, output_tokens: int) -> int:
    return default_catalog().get(model).cost_nanos(input_tokens, output_tokens)


def query_cost(model: str, messages: list[dict], answer: str) -> int:
    return price(model, count_message_tokens(messages, model), count_tokens(answer, model))


# ----------------------------------------------------------------------------- loading

def load_gsm8k(data: Path) -> list[Query]:
    csv.field_size_limit(1 << 30)
    contaminated = {json.loads(line)["eval_prompt"].strip()
                    for line in (data / "gsm8k/contaminated_prompts.jsonl").open()}
    queries = []
    with (data / "gsm8k/gsm8k_responses.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["prompt"].strip() in contaminated:
                continue
            messages = [{"role": "user", "content": row["prompt"]}]
            answer = {WEAK: row[f"{CSV_WEAK}_response"], STRONG: row[f"{STRONG}_response"]}
            queries.append(Query(
                prompt=row["prompt"],
                cost={m: query_cost(m, messages, answer[m]) for m in (WEAK, STRONG)},
                quality={WEAK: float(row[CSV_WEAK] == "True"),
                         STRONG: float(row[STRONG] == "True")},
                answer=answer))
    return queries


_CONVERSATION = re.compile(r"<\|The Start of Assistant A's Conversation with User\|>(.*?)"
                           r"<\|The End of Assistant A's Conversation with User\|>", re.S)
_CATEGORY_TASK = {"reasoning": "complex_reasoning", "math": "complex_reasoning",
                  "coding": "code_generation", "extraction": "analysis",
                  "stem": "analysis", "humanities": "analysis", "writing": None,
                  "roleplay": None}


def load_mt_bench(data: Path) -> list[Query]:
    contaminated = {json.loads(line)["eval_prompt"].strip()
                    for line in (data / "mt_bench/contaminated_prompts.jsonl").open()}
    lines = (data / "mt_bench/question.jsonl").open()
    questions = {q["question_id"]: q for q in map(json.loads, lines)
                 if q["turns"][0].strip() not in contaminated}
    scores: dict[tuple[int, int, str], float] = {}
    answers: dict[tuple[int, str], list[str]] = {}
    for judgement in map(json.loads, (data / "mt_bench/judgements.jsonl").open()):
        model = STRONG if judgement["model"] == STRONG else WEAK
        scores[(judgement["question_id"], judgement["turn"], model)] = float(judgement["score"])
        if judgement["turn"] == 2:  # the multi-turn judgement shows both of the model's answers
            conversation = _CONVERSATION.search(judgement["user_prompt"]).group(1)
            parts = re.split(r"\n### (?:User|Assistant A):\n", conversation)
            answers[(judgement["question_id"], model)] = [parts[2].strip(), parts[4].strip()]
    queries = []
    for qid, question in sorted(questions.items()):
        for turn in (1, 2):
            if any((qid, turn, m) not in scores for m in (WEAK, STRONG)):
                continue
            cost, answer = {}, {}
            for model in (WEAK, STRONG):
                history = answers[(qid, model)]
                messages = [{"role": "user", "content": question["turns"][0]}]
                if turn == 2:
                    messages += [{"role": "assistant", "content": history[0]},
                                 {"role": "user", "content": question["turns"][1]}]
                answer[model] = history[turn - 1]
                cost[model] = query_cost(model, messages, answer[model])
            prompt = "\n\n".join(question["turns"][:turn])
            queries.append(Query(prompt=prompt, cost=cost,
                                 quality={m: scores[(qid, turn, m)] for m in (WEAK, STRONG)},
                                 answer=answer,
                                 task_type=_CATEGORY_TASK.get(question["category"])))
    return queries


# ----------------------------------------------------------------------- GSM8K checks

_FINAL = r"####\s*\$?\s*(-?[\d,]*\.?\d+)"
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?%?"
# "12 * 3 = 36", "$5 + $7 + 8 = $20", and calculator annotations "<<12*3=36>>"
_EQUATION = re.compile(rf"((?:{_NUMBER}\s*[-+*/x×÷]\s*)+{_NUMBER})\s*=\s*({_NUMBER})")
_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")


def _number(text: str) -> float | None:
    cleaned = text.replace("$", "").replace(",", "").replace("%", "").strip()
    try:
        return float(cleaned)
    except ValueError:
        return None


def _evaluate(expression: str) -> float | None:
    expression = (expression.replace("$", "").replace(",", "").replace("%", "")
                  .replace("×", "*").replace("x", "*").replace("÷", "/"))
    if not re.fullmatch(r"[\d.\s+\-*/()]+", expression):
        return None
    try:
        return float(eval(expression, {"__builtins__": {}}, {}))  # digits and operators only
    except (SyntaxError, ZeroDivisionError, ValueError):
        return None


def _equations(text: str) -> list[tuple[float | None, float | None]]:
    found = [(_evaluate(m.group(1)), _number(m.group(2))) for m in _ANNOTATION.finditer(text)]
    stripped = _ANNOTATION.sub("", text)
    found += [(_evaluate(m.group(1)), _number(m.group(2))) for m in _EQUATION.finditer(stripped)]
    return found


def arithmetic_holds(text: str) -> str | None:
    """Every equation the answer writes down recomputes to the result it states."""
    for computed, stated in _equations(text):
        if computed is None or stated is None:
            continue
        if abs(computed - stated) > 1e-6 * max(1.0, abs(stated)) + 0.011:  # cents rounding
            return f"arithmetic error: computes {computed:g}, states {stated:g}"
    return None


def final_is_computed(text: str) -> str | None:
    """Self-consistency: the final answer is a number the worked solution produced."""
    final = re.search(_FINAL, text)
    if final is None:
        return "no final answer"
    value = _number(final.group(1))
    results = {stated for _, stated in _equations(text) if stated is not None}
    body_numbers = {_number(n) for n in re.findall(_NUMBER, text[:final.start()])}
    if value in results or (not results and value in body_numbers):
        return None
    return f"final answer {value:g} is not a result of the worked solution"


CHECKS = {
    "final answer line": [MatchesRegex(_FINAL)],
    "+ arithmetic verified": [MatchesRegex(_FINAL), arithmetic_holds],
    "+ self-consistent": [MatchesRegex(_FINAL), arithmetic_holds, final_is_computed],
}


# --------------------------------------------------------------------------- policies

@dataclass
class Outcome:
    policy: str
    quality: float
    cost_nanos: int
    strong_share: float  # fraction of queries answered by (or routed to) the strong model


def fixed(name: str, queries: list[Query], model: str) -> Outcome:
    return Outcome(name, sum(q.quality[model] for q in queries) / len(queries),
                   sum(q.cost[model] for q in queries), float(model == STRONG))


def route_by_mask(name: str, queries: list[Query], strong: list[bool]) -> Outcome:
    picks = [STRONG if s else WEAK for s in strong]
    quality = sum(q.quality[m] for q, m in zip(queries, picks, strict=True))
    cost = sum(q.cost[m] for q, m in zip(queries, picks, strict=True))
    return Outcome(name, quality / len(queries), cost, sum(strong) / len(queries))


def longest_to_strong(queries: list[Query], share: float) -> Outcome:
    k = round(share * len(queries))
    longest = set(sorted(range(len(queries)), key=lambda i: -len(queries[i].prompt))[:k])
    return route_by_mask(f"  longest {share:.1%} prompts to strong", queries,
                         [i in longest for i in range(len(queries))])


def random_at(queries: list[Query], share: float) -> Outcome:
    n = len(queries)
    weak, strong = fixed("", queries, WEAK), fixed("", queries, STRONG)
    return Outcome(f"  random {share:.1%} to strong (expected)",
                   weak.quality + share * (strong.quality - weak.quality),
                   int(weak.cost_nanos + share * (strong.cost_nanos - weak.cost_nanos)),
                   share) if n else weak


def cascade(name: str, queries: list[Query], checks: list, engine: Engine) -> Outcome:
    runner = Cascade([WEAK, STRONG], checks, engine=engine)
    quality = 0.0
    escalated = 0
    cost = 0
    for index, q in enumerate(queries):
        messages = [{"role": "user", "content": q.prompt}]

        def call(model: str, q: Query = q, messages: list = messages) -> Completion:
            return Completion(q.answer[model], input_tokens=count_message_tokens(messages, model),
                              output_tokens=count_tokens(q.answer[model], model))

        result = runner.run(call, messages=messages, request_id=f"{name}:{index}",
                            task_type="gsm8k")
        quality += q.quality[result.model]
        escalated += result.model == STRONG
        cost += result.cost_nanos
    return Outcome(name, quality / len(queries), cost, escalated / len(queries))


def oracle_cascade(queries: list[Query]) -> Outcome:
    quality = cost = escalated = 0
    for q in queries:
        cost += q.cost[WEAK]
        if q.quality[WEAK] >= 1:
            quality += 1
        else:
            escalated += 1
            cost += q.cost[STRONG]
            quality += q.quality[STRONG]
    return Outcome("cascade, perfect check (oracle ceiling)", quality / len(queries), cost,
                   escalated / len(queries))


def router_mask(queries: list[Query], router: Router, *,
                use_task_type: bool = False) -> list[bool]:
    return [router.route(messages=[{"role": "user", "content": q.prompt}],
                         task_type=q.task_type if use_task_type else None).model == STRONG
            for q in queries]


def router_rows(queries: list[Query], share: float, *, with_task_type: bool) -> list[Outcome]:
    """The router with default thresholds, calibrated on the prompts (``Router.calibrate``,
    label-free) to send ``share`` to GPT-4, and with task types when the data has them."""
    def new_router() -> Router:
        return Router({"low": WEAK, "high": STRONG}, default_max_output_tokens=512)

    calibrated = new_router()
    threshold = calibrated.calibrate([q.prompt for q in queries], high_share=share)[1]
    plans = [("router: complexity, default thresholds", new_router(), False),
             (f"router: calibrated, complexity >= {threshold:.3f}", calibrated, False)]
    if with_task_type:
        plans.append(("router: task type (category), else complexity", new_router(), True))
    rows: list[Outcome] = []
    for label, router, use_task_type in plans:
        result = route_by_mask(label, queries,
                               router_mask(queries, router, use_task_type=use_task_type))
        rows.append(result)
        if result.strong_share > 0:
            rows += [longest_to_strong(queries, result.strong_share),
                     random_at(queries, result.strong_share)]
    return rows


# ----------------------------------------------------------------------------- report

def table(title: str, outcomes: list[Outcome], *, unit: str, n: int) -> str:
    strong = next(o for o in outcomes if o.policy == "always strong (GPT-4)")
    weak = next(o for o in outcomes if o.policy == "always cheap (Mixtral)")
    lines = [f"\n{title} ({n} queries)",
             f"{'policy':<46} {unit:>9} {'% of GPT-4':>10} {'to GPT-4':>9} {'cost $':>9} "
             f"{'cost vs GPT-4':>13}"]
    span = strong.quality - weak.quality
    for o in outcomes:
        quality = f"{o.quality:.2%}" if unit == "accuracy" else f"{o.quality:.2f}"
        lines.append(f"{o.policy:<46} {quality:>9} {o.quality / strong.quality:>10.1%} "
                     f"{o.strong_share:>9.1%} {o.cost_nanos / 1e9:>9.4f} "
                     f"{o.cost_nanos / strong.cost_nanos:>13.1%}")
    lines.append(f"(quality gap cheap->strong: {span:.4g}; cost vs GPT-4 = policy cost / "
                 "always-strong cost)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--strong-share", type=float, default=0.25,
                        help="share of queries the calibrated router sends to GPT-4")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    catalog = default_catalog()
    print(f"prices (catalog): {STRONG} ${catalog.get(STRONG).input_cost_per_token * 1e6:g}/"
          f"${catalog.get(STRONG).output_cost_per_token * 1e6:g} per 1M in/out; {WEAK} "
          f"${catalog.get(WEAK).input_cost_per_token * 1e6:g}/"
          f"${catalog.get(WEAK).output_cost_per_token * 1e6:g}")

    gsm = load_gsm8k(args.data)
    outcomes = [fixed("always cheap (Mixtral)", gsm, WEAK),
                fixed("always strong (GPT-4)", gsm, STRONG)]
    with tempfile.TemporaryDirectory() as tmp, Engine(db=f"{tmp}/bench.db") as engine:
        for label, checks in CHECKS.items():
            result = cascade(f"cascade: {label}", gsm, checks, engine)
            outcomes += [result, longest_to_strong(gsm, result.strong_share),
                         random_at(gsm, result.strong_share)]
        rows = engine.usage()
        ledger = sum(r.cost_nanos for r in rows)
        attempts = len(rows)
    outcomes += router_rows(gsm, args.strong_share, with_task_type=False)
    outcomes.append(oracle_cascade(gsm))
    print(table("GSM8K: cascade with checks on Mixtral's real answer text", outcomes,
                unit="accuracy", n=len(gsm)))
    cascade_total = sum(o.cost_nanos for o in outcomes if o.policy.startswith("cascade:"))
    print(f"ledger: {attempts} usage rows written by the cascades, ${ledger / 1e9:.4f} "
          f"(sum of the three cascade rows above: ${cascade_total / 1e9:.4f})")

    mt = load_mt_bench(args.data)
    outcomes = [fixed("always cheap (Mixtral)", mt, WEAK),
                fixed("always strong (GPT-4)", mt, STRONG)]
    outcomes += router_rows(mt, args.strong_share, with_task_type=True)
    print(table("MT-Bench: router decides before the call (GPT-4 judge score 1-10)", outcomes,
                unit="score", n=len(mt)))
    print(f"\n{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
