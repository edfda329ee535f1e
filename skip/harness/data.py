"""Evaluation data, read in place from ../shared/data: Spec-Bench, MT-Bench's reference answers
and AlpacaEval instructions. AdaInfer's next-token tasks are in tasks.py."""
from __future__ import annotations

import ast
import json

from tokenizer import encode_chat

from .. import DATA

SPECBENCH = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


def as_list(field):
    """Spec-Bench stores some lists as their JSON text and others as their Python repr."""
    if not isinstance(field, str):
        return field
    try:
        return json.loads(field)
    except json.JSONDecodeError:
        return ast.literal_eval(field)


def specbench(category, n=None):
    """The first n (first turn, reference answer or None) of a Spec-Bench category, in file
    order; "mt_bench" is the file's MT-Bench part (its own eight categories)."""
    if category not in SPECBENCH:
        raise ValueError(f"unknown Spec-Bench category {category!r} ({', '.join(SPECBENCH)})")
    rows = [json.loads(line) for line in (DATA / "specbench" / "question.jsonl").open()]
    rows = [r for r in rows if (r["category"] in MT_BENCH if category == "mt_bench" else r["category"] == category)]
    return [(as_list(r["turns"])[0], as_list(r.get("reference", "[null]"))[0]) for r in rows[:n]]


def mix(by_category, n):
    """The first n items, one from each list in turn: [[a1, a2], [b1]] -> a1 b1 a2."""
    return [xs[i] for i in range(max(map(len, by_category))) for xs in by_category if i < len(xs)][:n]


def specbench_mix(tok, n, skip=0):
    """Chat-encoded first turns, one from each Spec-Bench category in turn (so a batch mixes
    kinds and lengths): the n after the first `skip` of that order."""
    per = -(-(n + skip) // len(SPECBENCH))
    return [encode_chat(tok, q) for q, _ in mix([specbench(c, per) for c in SPECBENCH], n + skip)[skip:]]


def mtbench_references(n):
    """(first turn, GPT-4 reference answer) of the MT-Bench questions that have one."""
    qs = [json.loads(line) for line in (DATA / "mtbench" / "question.jsonl").open()]
    qs = {q["question_id"]: q for q in qs}
    refs = [json.loads(line) for line in (DATA / "mtbench" / "reference_answer_gpt-4.jsonl").open()]
    return [(qs[r["question_id"]]["turns"][0], r["choices"][0]["turns"][0]) for r in refs][:n]


def alpaca_instructions(n=None):
    return [json.loads(line)["instruction"] for line in (DATA / "alpaca" / "alpaca_eval.jsonl").open()][:n]
