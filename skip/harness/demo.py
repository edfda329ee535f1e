"""The three methods side by side on SmolLM2-135M-Instruct (`make demo`).

python -m skip.harness.demo [--max-new 32] [--prompts 4]

Four built-in prompts (written for this project): a sentiment question, a multiple-choice
question, a short chat request, a summarization request. Every method decodes greedily; per
method and prompt: the answer (shortened), layers run per generated token after the prompt
(verification of rejected drafts included), decode FLOPs and wall-clock per generated token
against the full model in the same run (the prompt pass, identical for all, subtracted), and
agreement with the full model's tokens, position by position.
- AdaInfer: an SVM stop classifier (gap, top prob) fitted here, in seconds, on the model's own
  greedy answers to 4 AlpacaEval instructions ("final" labels), checks after every layer with
  the full head, skipped layers filled by state propagation (skip/adainfer_gen.py).
- Kangaroo: the committed adapter weights/kangaroo-l2, draft head on its 4096 most frequent
  tokens, gamma 6, eta 0.6 (skip/kangaroo.py).
- Unified Layer Skipping at 2x: weights/unified-2x when `make finetune-skipping` made it,
  otherwise the base model without fine-tuning (the table says which).
Below the table, one line per method says what to notice in its rows, and why.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model import add_load_args, flops, generate, load_model
from model.files import write_text_atomic
from model.products import sync
from tokenizer import encode_chat, load_tokenizer

from .. import DEFAULT_MODEL, WEIGHTS
from ..adainfer import SVM
from ..adainfer_gen import generate_adainfer
from ..finetune import tuned_checkpoint
from ..kangaroo import generate_kangaroo, load_adapter
from ..unified import generate_unified
from .data import alpaca_instructions

DRAFT_VOCAB = 4096  # Kangaroo's draft head: the adapter's K most frequent tokens
N_FIT = 4  # AlpacaEval instructions whose answers fit the demo's AdaInfer classifier
PROMPTS = [
    "Is the sentiment of this review positive or negative? \"The soup was cold and the waiter ignored us "
    "for an hour.\" Answer with one word.",
    "Which of these is a mammal? A) shark B) dolphin C) trout D) octopus. Answer with the letter.",
    "What should I pack for a weekend trip to the beach?",
    "Summarize in one sentence: The town council voted on Tuesday to turn the old railway station into a "
    "public library. Work starts next spring and should take two years; the cost is shared by the town "
    "and a regional fund.",
]


def measure(model, ids, fn):
    """(tokens, layer-token evaluations after the prompt, decode FLOPs, decode seconds)."""
    t0 = time.perf_counter()
    model(torch.tensor([ids], device=model.device), last_only=True)  # the prompt pass alone, to subtract
    sync()
    t1 = time.perf_counter()
    with model.recording() as runs:
        tokens = fn(ids)
    secs = time.perf_counter() - t1 - (t1 - t0)
    L = model.cfg.n_layers
    layer_tokens = sum(r.n for r in runs if hasattr(r, "layer")) - L * len(ids)
    return tokens, layer_tokens, flops.total(model.cfg, runs) - flops.prefill_flops(model.cfg, len(ids)), secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--adapter", type=Path, default=WEIGHTS / "kangaroo-l2", help="Kangaroo's adapter")
    ap.add_argument("--json", help="also write the table as JSON here")
    add_load_args(ap)
    a = ap.parse_args(argv)
    with torch.no_grad():
        return run(a)


def run(a):
    model, tok = load_model(a.model, a.dtype, device=a.device), load_tokenizer(a.model)
    N = a.max_new

    t0 = time.perf_counter()
    traces = [t for q in alpaca_instructions(N_FIT)
              for t in generate_adainfer(model, encode_chat(tok, q), None, N, collect=True).traces]
    svm = SVM().fit(traces, "final")
    print(f"AdaInfer: SVM fitted on {len(traces)} token traces of 4 AlpacaEval answers "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    adapter = load_adapter(a.adapter, model)
    tuned = tuned_checkpoint(model.cfg, "unified", 2)
    unified_model = load_model(tuned, a.dtype, device=a.device) if tuned else model

    methods = {
        "full": lambda ids: generate(model, [ids], max_new_tokens=N)[0],
        "AdaInfer (SVM)": lambda ids: generate_adainfer(model, ids, svm, N).tokens,
        f"Kangaroo (l={adapter.l}, top-{DRAFT_VOCAB} draft head)":
            lambda ids: generate_kangaroo(model, ids, adapter, max_new_tokens=N, draft_vocab=DRAFT_VOCAB).tokens,
        f"Unified 2x ({'fine-tuned' if tuned else 'not fine-tuned'})":
            lambda ids: generate_unified(unified_model, [ids], 2, max_new_tokens=N)[0],
    }
    prompts = PROMPTS[:a.prompts]
    results, bar = [], tqdm(total=len(prompts) * len(methods), desc="demo")
    for text in prompts:
        ids = encode_chat(tok, text)
        full = None
        for name, fn in methods.items():
            tokens, layer_tokens, fl, secs = measure(unified_model if name.startswith("Unified") else model, ids, fn)
            full = full or (tokens, fl, secs)
            results.append({"prompt": text, "method": name, "answer": tok.decode(tokens).replace("<|im_end|>", ""),
                            "layers_per_token": layer_tokens / max(1, len(tokens) - 1),
                            "flops_ratio": (fl / len(tokens)) / (full[1] / len(full[0])),
                            "wall_clock_ratio": (secs / len(tokens)) / (full[2] / len(full[0])),
                            "agreement": sum(x == y for x, y in zip(tokens, full[0])) / len(full[0])})
            bar.update()
    bar.close()
    print(table(results))
    print("\nWhat to see:")
    for name in methods:
        print(f"- {name}: {what_to_see(name, model.cfg.n_layers, tuned)}")
    if a.json:
        write_text_atomic(a.json, json.dumps(results, indent=1))
    return results


def what_to_see(method, L, tuned):
    """One line per method: what a learner should notice in its rows, and why."""
    if method == "full":
        return f"the reference: all {L} layers for every token; every ratio and agreement is against it."
    if method.startswith("AdaInfer"):
        return ("stops after a layer or two and the answer falls apart: on a model this small the early layers' "
                "logit lens is confident (about an echo of the input) but rarely names the final token, so the "
                "stop classifier learns to stop early; the paper's 7B-70B models have depth to spare.")
    if method.startswith("Kangaroo"):
        return ("agreement is 1.00 by construction (every draft is verified by the full model); it runs more "
                "layer-positions and FLOPs than the full model, since rejected drafts are verified too, and saves "
                "time only as far as its drafts are accepted.")
    if tuned:
        return ("the kept half of the layers for every token, fine-tuned with that pattern (the FLOPs ratio stays "
                "above 0.5: the head and embeddings do not shrink); the text drifts from the full model's, since a "
                "model this small has little redundant depth.")
    return ("not fine-tuned, so skipping half the layers gives garbage: the paper fine-tunes with the skip pattern. "
            "`make finetune-skipping SKIP_R=2` makes that checkpoint (weights/unified-2x), used here when present.")


def short(text, n=60):
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


def table(results):
    lines = ["| prompt | method | answer | layers/token | FLOPs ratio | wall-clock ratio | agreement |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {short(r['prompt'], 28)} | {r['method']} | {short(r['answer'])} | {r['layers_per_token']:.1f} | "
              f"{r['flops_ratio']:.2f} | {r['wall_clock_ratio']:.2f} | {r['agreement']:.2f} |" for r in results]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
