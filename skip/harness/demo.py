"""The three methods, each where its paper applies it, on SmolLM2-135M-Instruct (`make demo`).

python -m skip.harness.demo [--tasks sst2 csqa] [--n-train 40] [--n-test 60] [--prompts 4] [--max-new 32]

1. AdaInfer (skip/harness/demo_adainfer.py), in its paper's setting: one forward pass per
   prompt whose answer is its next token, scored over the answer choices, on SST-2 sentiment and
   CommonsenseQA multiple choice. The paper's SVM on (gap, top prob) fitted on the TRAIN split,
   the paper's gap >= 0.8, and ours, the gap threshold fitted on the train split; on a sample of
   the eval split: accuracy against gold, agreement with the full model's answer, layers run
   per prompt, FLOPs and wall-clock against the full model; a few prompts one by one; the oracle.
2. Generation on held-out Spec-Bench prompts (summarization, translation, QA, math), greedy:
   - Kangaroo (its paper's Spec-Bench): the committed adapter weights/kangaroo-l2, draft head
     on its 4096 most frequent tokens, gamma 6, eta 0.6; lossless, so its tokens are the plain
     greedy ones; acceptance beside its speed.
   - Unified Layer Skipping at 2x (its paper's summarization and translation): untuned, and
     fine-tuned with the kept-layer pattern as the paper does: the committed low-rank
     fine-tune weights/unified-2x-lora (skip/train/lora.py; `python -m skip.train.finetune --method unified --r 2 --lora 8`),
     and the full fine-tune weights/unified-2x when `make finetune-skipping` made it.
   - AdaInfer per generated token: our extension (skip/adainfer_gen.py), not the paper's method.
   Per row: layers run per generated token (its measured budget), decode FLOPs and decode
   wall-clock per token against the full model in the same run (medians of --runs interleaved
   runs), and beside them quality: token agreement with the full model position by position,
   and ROUGE-L of the answer against the full model's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from model import add_load_args, flops, generate, load_model
from model.cli import command, threads, writable_file
from tokenizer import encode_chat, load_tokenizer
from weights.files import check_not_reading, write_text_atomic

from .. import DEFAULT_MODEL, WEIGHTS
from ..adainfer import SVM
from ..adainfer_gen import generate_adainfer
from ..train.finetune import tuned_checkpoint
from ..kangaroo import generate_kangaroo
from ..kangaroo_files import load_adapter
from ..train.lora import LoRAError, load_lora
from ..unified import generate_unified
from .data import alpaca_instructions, specbench
from .demo_adainfer import adainfer_task, short
from .tasks import load_task
from .report import RESULT, markdown_table, record, token_match
from .runner import Contender, compare

DRAFT_VOCAB = 4096  # Kangaroo's draft head: the adapter's K most frequent tokens
N_FIT = 2  # AlpacaEval instructions whose answers fit the per-token extension's classifier
GEN_PROMPTS = [("summarization", 4), ("translation", 0), ("qa", 0), ("math_reasoning", 0)]  # Spec-Bench, held out
UNTUNED = "Unified 2x, NOT fine-tuned (the paper fine-tunes)"
EXTENSION = "AdaInfer per generated token (ours, not the paper's)"


@command
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "csqa"], help="AdaInfer's tasks (skip/harness/tasks.py)")
    ap.add_argument("--n-train", type=int, default=40, help="train prompts the SVM is fitted on, per task")
    ap.add_argument("--n-test", type=int, default=60, help="eval prompts scored, per task")
    ap.add_argument("--time-n", type=int, default=5, help="eval prompts timed live, per task")
    ap.add_argument("--prompts", type=int, default=len(GEN_PROMPTS), help="generation prompts")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2, help="timed runs of each generation (median)")
    ap.add_argument("--adapter", type=Path, default=WEIGHTS / "kangaroo-l2", help="Kangaroo's adapter")
    ap.add_argument("--lora", type=Path, default=WEIGHTS / "unified-2x-lora", help="Unified 2x's low-rank fine-tune")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--threads", type=threads, default=1, help="CPU threads (default 1: on 2 cores that other jobs "
                    "share, 2 threads ran this demo several times slower; on an idle machine more are faster)")
    add_load_args(ap)
    a = ap.parse_args(argv)
    if min(a.n_train, a.n_test, a.prompts, a.max_new, a.runs, a.threads) < 1 or a.time_n < 0:
        ap.error("need --n-train, --n-test, --prompts, --max-new, --runs, --threads >= 1 and --time-n >= 0")
    if a.json:
        writable_file(a.json, "--json", RESULT)  # a new file or a result of ours, and nothing it reads
        check_not_reading(a.json, a.model)
    for name in a.tasks:  # read before the model loads: AdaInfer here scores over a task's answer choices
        if load_task(name, a.n_train, a.n_test).test[0].choices is None:
            ap.error(f"--tasks {name}: the demo scores over answer choices, and this task has none")
    torch.set_num_threads(a.threads)
    with torch.no_grad():
        return run(a)


def run(a):
    t0 = time.perf_counter()
    model, tok = load_model(a.model, a.dtype, device=a.device), load_tokenizer(a.model)
    load_adapter(a.adapter, model)  # part 2's adapter checked before part 1, not after it
    out = {"adainfer": [adainfer_task(model, tok, a, name) for name in a.tasks]}
    t1 = time.perf_counter()
    out["generation"] = generation(model, tok, a)
    print(f"\n(demo: {time.perf_counter() - t0:.0f} s, of which AdaInfer {t1 - t0:.0f} s)", file=sys.stderr)
    if a.json:
        write_text_atomic(a.json, record(json.loads(json.dumps(out, default=lambda o: None))))
    return out


# ---------------------------------------------------------------- 2. generation
def methods_for(model, tok, a):
    """{label: (the model it runs on, fn(ids) -> (tokens, Kangaroo's round counts or {}))}."""
    N, cfg = a.max_new, model.cfg
    adapter = load_adapter(a.adapter, model)

    def kangaroo(ids):
        out = generate_kangaroo(model, ids, adapter, max_new_tokens=N, draft_vocab=DRAFT_VOCAB)
        return out.tokens, {"rounds": len(out.rounds), "drafted": sum(r.drafted for r in out.rounds),
                            "accepted": sum(r.accepted for r in out.rounds)}
    methods = {"full model": (model, lambda ids: (generate(model, [ids], max_new_tokens=N)[0], {})),
               f"Kangaroo (l={adapter.l}, top-{DRAFT_VOCAB} draft head)": (model, kangaroo)}
    unified = {UNTUNED: model}
    try:
        tuned = load_model(a.model, a.dtype, device=a.device)
        meta = load_lora(a.lora, tuned)
        unified[f"Unified 2x, low-rank fine-tune (rank {meta['rank']}, {meta['steps']} steps; ours)"] = tuned
    except LoRAError as e:
        print(f"Unified 2x: no low-rank fine-tune ({e})", file=sys.stderr)
    full_ck = tuned_checkpoint(cfg, "unified", 2)
    if full_ck:
        unified["Unified 2x, full fine-tune (as the paper)"] = load_model(full_ck, a.dtype, device=a.device)
    for label, m in unified.items():
        methods[label] = (m, lambda ids, m=m: (generate_unified(m, [ids], 2, max_new_tokens=N)[0], {}))
    traces = [t for q in alpaca_instructions(N_FIT)
              for t in generate_adainfer(model, encode_chat(tok, q), None, N, collect=True).traces]
    try:  # fitted on the model's own answers to AlpacaEval instructions ("final" labels)
        svm = SVM().fit(traces, "final")
        methods[EXTENSION] = (model, lambda ids: (generate_adainfer(model, ids, svm, N).tokens, {}))
    except ValueError as e:
        print(f"{EXTENSION}: not fitted ({e})", file=sys.stderr)
    return methods


def generation(model, tok, a):
    """Every method on each prompt, the methods taking turns within each of --runs runs
    (runner.compare); the tokens are the same every run (greedy), the decode times are medians."""
    from rouge_score import rouge_scorer  # the bench extra, which `make demo` installs
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    methods = methods_for(model, tok, a)
    prompts = [specbench(cat, i + 1)[i][0] for cat, i in GEN_PROMPTS[:a.prompts]]
    got = compare([Contender(label, lambda ps, fn=fn: fn(ps[0]), m) for label, (m, fn) in methods.items()],
                  [[encode_chat(tok, text)] for text in prompts], a.runs, record=True, desc="generation")
    rows = []
    for i, text in enumerate(prompts):
        full_tokens = got["full model"].outputs[i][0]
        full_text = clean(tok.decode(full_tokens))
        for label, r in got.items():
            tokens, counts = r.outputs[i]
            fed = max(1, len(tokens) - 1)  # tokens fed back: what the decode span runs
            _, layer_tokens, fl = flops.per_decode_token(model.cfg, r.records[i])  # from the first token fed back
            answer = clean(tok.decode(tokens))
            rows.append({"prompt": text, "method": label, "tokens": tokens, "answer": answer, "fed": fed,
                         "layer_tokens": layer_tokens, "decode_flops": fl, "decode_ms": r.ms[i],
                         "agreement": token_match(tokens, full_tokens),
                         "rougeL_vs_full": scorer.score(full_text, answer)["rougeL"].fmeasure,
                         **{k: counts.get(k) for k in ("rounds", "drafted", "accepted")}})
    summary = summarize(rows)
    print_generation(rows, summary, len(prompts), a, model.cfg.n_layers)
    return {"rows": rows, "summary": summary}


def summarize(rows):
    """Per method over the prompts: layers per token, decode FLOPs and time per token against the
    full model's (totals over the prompts), mean agreement and ROUGE-L, Kangaroo's acceptance."""
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    tot = {m: {k: sum(r[k] for r in rs) for k in ("fed", "layer_tokens", "decode_flops", "decode_ms")}
           for m, rs in by.items()}
    full = tot["full model"]
    out = []
    for m, rs in by.items():
        t = tot[m]
        drafted = sum(r["drafted"] or 0 for r in rs)
        out.append({"method": m, "layers_per_token": t["layer_tokens"] / t["fed"],
                    "flops_ratio": (t["decode_flops"] / t["fed"]) / (full["decode_flops"] / full["fed"]),
                    "wall_clock_ratio": (t["decode_ms"] / t["fed"]) / (full["decode_ms"] / full["fed"]),
                    "agreement": statistics.mean(r["agreement"] for r in rs),
                    "rougeL_vs_full": statistics.mean(r["rougeL_vs_full"] for r in rs),
                    "acceptance": sum(r["accepted"] for r in rs) / drafted if drafted else None,
                    "tokens_per_pass": (sum(r["accepted"] + r["rounds"] for r in rs) / sum(r["rounds"] for r in rs)
                                        if drafted else None)})
    return out


def print_generation(rows, summary, n, a, L):
    print(f"\n## 2. Generation: {n} held-out Spec-Bench prompts, {a.max_new} greedy tokens each\n")
    print(markdown_table([[f"{s['method']} [{s['layers_per_token']:.1f} layers/token]", s["flops_ratio"],
                           s["wall_clock_ratio"], s["agreement"], 100 * s["rougeL_vs_full"],
                           "-" if s["acceptance"] is None else f"{s['acceptance']:.2f} / {s['tokens_per_pass']:.2f}"]
                          for s in summary],
                         ["method [measured budget]", "decode FLOPs ratio", "decode wall-clock ratio",
                          "token agreement with full", "ROUGE-L vs full", "drafts accepted / tokens per pass"],
                         ["", ".2f", ".2f", ".2f", ".1f", ""]))
    print()
    print(markdown_table([[short(r["prompt"], 30), r["method"], short(r["answer"], 60), r["agreement"],
                           100 * r["rougeL_vs_full"]] for r in rows],
                         ["prompt", "method", "answer", "agreement", "ROUGE-L vs full"], ["", "", "", ".2f", ".1f"]))
    print("\nWhat to see:")
    untuned = next(u["rougeL_vs_full"] for u in summary if u["method"] == UNTUNED)
    for s in summary:
        print(f"- {s['method']}: {what_to_see(s, L, untuned)}")


def what_to_see(s, L, untuned):
    """One line per method, from its measured numbers."""
    m, speed = s["method"], f"{1 / s['wall_clock_ratio']:.2f}x the full model's decode speed"
    if m == "full model":
        return f"the reference: all {L} layers for every token; every ratio and agreement is against it."
    if m.startswith("Kangaroo"):
        return (f"lossless (agreement {s['agreement']:.2f}: its tokens are plain greedy's); {s['acceptance']:.0%} of "
                f"its drafts accepted, {s['tokens_per_pass']:.2f} tokens per verification pass, {speed}: it runs more "
                "layer-positions than the full model (rejected drafts are verified too) and saves time only as far as "
                "its drafts are accepted (docs/results-kangaroo.md: 1.17x over 18 Spec-Bench prompts).")
    if m == UNTUNED:
        return (f"{s['layers_per_token']:.0f} of {L} layers per token ({speed}), but untuned: ROUGE-L "
                f"{100 * s['rougeL_vs_full']:.0f} against the full model's text. The paper fine-tunes with the "
                "kept-layer pattern: a low-rank fine-tune is committed (weights/unified-2x-lora, from `python -m "
                "skip.train.finetune --method unified --r 2 --lora 8 --max-tokens 128 --minutes 13`); `make "
                "finetune-skipping SKIP_R=2` makes the full one (weights/unified-2x, 30 minutes on 2 cores); each gets "
                "its row here when present.")
    if m.startswith("Unified"):
        return (f"the same {s['layers_per_token']:.0f} layers per token ({speed}; FLOPs ratio {s['flops_ratio']:.2f}, "
                "not 0.5: the head and embeddings do not shrink), fine-tuned with that pattern: ROUGE-L "
                f"{100 * s['rougeL_vs_full']:.0f} against the full model's text (untuned {100 * untuned:.0f}; the full "
                "model's own 100): docs/results-unified.md measures the fine-tunes' held-out quality against the full "
                "model's.")
    return (f"our extension, not the paper's method (its stop decision per generated token): "
            f"{s['layers_per_token']:.1f} layers per token, agreement {s['agreement']:.2f}: on this model the early "
            "layers' confidence stops it too early, as in part 1.")


def clean(text):
    return text.replace("<|im_end|>", "")


if __name__ == "__main__":
    main()
