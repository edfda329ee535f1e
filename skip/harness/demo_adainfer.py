"""Part 1 of `make demo` (skip/harness/demo.py): AdaInfer where its paper applies it, one forward
pass per prompt whose answer is its next token, scored over the task's answer choices.

Per task: the paper's SVM on (gap, top prob) of the logit lens, fitted on the TRAIN split with
"gold" labels; the paper's simple variant gap >= 0.8; ours, the gap threshold fitted on the
train split (the smallest whose answers agree with the full model's on 95% of its prompts); and a
perfect stop rule (the oracle) as the ceiling this model allows. Scored on the eval split from
one traced pass per prompt (each rule's decision read from the features it would see live, as
skip/harness/eval_adainfer.py does; tests/test_demo.py checks them against live runs), a few
prompts timed live against the full forward.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from weights.files import cache_key, device_tag

from ..adainfer import SVM, Threshold
from .eval_adainfer import simulate, traces_of, wall_clock_ratios
from .report import markdown_table
from .tasks import encode, load_task

N_EXAMPLES = 3  # eval prompts shown one by one per task
TAU = 0.8  # the paper's gap threshold
ORACLE = "oracle: a perfect stop rule (reference)"


def adainfer_task(model, tok, a, name):
    """Fit on the train split, score the eval split from one traced pass per prompt (each rule's
    decision read from the features it would see live), time a few prompts live, print it all."""
    task = load_task(name, a.n_train, a.n_test)
    enc = {s: [encode(tok, i) for i in getattr(task, s)] for s in ("train", "test")}
    tag = cache_key(a.model, [], *device_tag(model))  # traces cached in runs/adainfer-cache under it
    traces = {s: traces_of(model, tag, enc[s], lambda c: torch.tensor(c)) for s in enc}  # lens over the choices
    cfg, V, L = model.cfg, len(task.test[0].choices), model.cfg.n_layers
    rules = {}
    try:
        rules["AdaInfer, SVM (paper)"] = SVM().fit(traces["train"], "gold")
    except ValueError as e:  # no layer right on the train split: nothing to learn
        print(f"{name}: SVM not fitted: {e}", file=sys.stderr)
    rules[f"AdaInfer, gap >= {TAU} (paper's simple variant)"] = Threshold(TAU)
    tau = calibrated_tau(traces["train"], enc["train"], cfg, V)
    rules[f"AdaInfer, gap >= {tau:.2f}: tau fitted on the train split (ours)"] = Threshold(tau)
    lengths = [len(ids) for ids, _, _ in enc["test"]]
    full_top1 = [t.top1[-1] for t in traces["test"]]
    wall = wall_clock_ratios(model, enc["test"][:a.time_n], rules, torch.tensor, runs=3)
    rows = [{"rule": "full model", "layers_per_prompt": float(L), "flops_ratio": 1.0, "wall_clock_ratio": 1.0,
             "accuracy": float(np.mean([t.top1[-1] == t.answer for t in traces["test"]])), "agreement": 1.0}]
    stops = {"full model": [L - 1] * len(lengths)}
    for label, clf in [*rules.items(), (ORACLE, "oracle")]:
        s = simulate(clf, traces["test"], lengths, cfg, V)
        stops[label] = s["exits"]
        answers = [t.top1[e] for t, e in zip(traces["test"], s["exits"])]
        rows.append({"rule": label, "layers_per_prompt": float(np.mean(s["exits"])) + 1,
                     "flops_ratio": s["flops_ratio"], "wall_clock_ratio": wall.get(label), "accuracy": s["accuracy"],
                     "agreement": float(np.mean([x == y for x, y in zip(answers, full_top1)]))})
    examples = []
    for i, (inst, (ids, answer, choices)) in enumerate(zip(task.test[:N_EXAMPLES], enc["test"])):
        ex = {"prompt": inst.prompt, "ids": ids, "choices": choices, "gold": tok.decode([answer])}
        for label in ["full model", *rules]:
            layer = stops[label][i]
            pred = traces["test"][i].top1[layer]
            ex[label] = {"answer_id": pred, "answer": tok.decode([pred]), "stop_layer": layer}
        examples.append(ex)
    res = {"task": name, "n_train": len(enc["train"]), "n_test": len(enc["test"]), "timed": min(a.time_n, len(lengths)),
           "rows": rows, "examples": examples, "classifiers": rules,
           "full_answers": [tok.decode([t]) for t in full_top1]}
    print_adainfer(res, L)
    return res


def calibrated_tau(traces, encoded, cfg, V, target=0.95):
    """Ours: the smallest gap threshold (steps of 0.01) whose answers on the train split agree
    with the full model's on `target` of the prompts; 1.0 (stop only at gap 1) if none does."""
    lengths = [len(ids) for ids, _, _ in encoded]
    for tau in np.arange(0.5, 1.0, 0.01).round(2):
        exits = simulate(Threshold(tau), traces, lengths, cfg, V)["exits"]
        if np.mean([t.top1[e] == t.top1[-1] for t, e in zip(traces, exits)]) >= target:
            return float(tau)
    return 1.0


def print_adainfer(res, L):
    name, rows = res["task"], res["rows"]
    print(f"\n## 1. AdaInfer on {name}: one forward pass per prompt, answer scored over the choices\n")
    print(f"SVM fitted on {res['n_train']} {name} train prompts; scored on {res['n_test']} eval prompts "
          f"(wall-clock: {res['timed']} of them live, medians of interleaved runs).\n")
    print(markdown_table([[f"{r['rule']} [{r['layers_per_prompt']:.1f} layers/prompt]", r["flops_ratio"],
                           "-" if r["wall_clock_ratio"] is None else r["wall_clock_ratio"],
                           100 * r["accuracy"], r["agreement"]] for r in rows],
                         ["rule [measured budget]", "FLOPs ratio", "wall-clock ratio", "accuracy % (gold)",
                          "agreement with full"], ["", ".2f", ".2f", ".1f", ".2f"]))
    labels = [r["rule"] for r in rows if r["rule"] != ORACLE]
    print()
    print(markdown_table([[short(ex["prompt"], 70), ex["gold"]]
                          + [f"{ex[l]['answer']} (stop after layer {ex[l]['stop_layer'] + 1})" for l in labels]
                          for ex in res["examples"]], ["eval prompt", "gold"] + labels))
    full, oracle = rows[0], rows[-1]
    answers = res["full_answers"]
    common = max(set(answers), key=answers.count)
    if answers.count(common) >= 0.9 * len(answers):
        print(f"- The full model answers {common!r} to {answers.count(common)} of {len(answers)} eval prompts "
              f"(accuracy {100 * full['accuracy']:.0f}%): it does not solve this task, so a rule that agrees with it "
              "early only finds where that fixed answer settles.")
    for r in rows[1:-1]:
        print(f"- {r['rule']}: {r['layers_per_prompt']:.1f} of {L} layers per prompt, accuracy "
              f"{100 * r['accuracy']:.0f}% (full model {100 * full['accuracy']:.0f}%), the full model's answer on "
              f"{r['agreement']:.0%} of prompts.")
    print(f"- The oracle needs {oracle['layers_per_prompt']:.1f} layers per prompt on average: the depth a stop rule "
          "could save at no loss on this model. Where the rules stop far earlier and lose accuracy, the logit lens of "
          "the early layers is confident but not yet right (docs/results-adainfer.md); the paper's 7B-70B models "
          "settle earlier.")


def short(text, n=60):
    """text on one line, at most n characters, as a table cell."""
    text = " ".join(text.split())
    return (text if len(text) <= n else text[:n - 3] + "...").replace("|", "\\|")

