"""The three methods side by side on SmolLM2-135M-Instruct (`make demo`).

python -m skip.demo [--max-new 32] [--prompts 4]

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
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from model import flops, generate, load_model
from tokenizer import chatml, load_tokenizer

from .adainfer import SVM
from .adainfer_gen import generate_adainfer
from .finetune import DATA, ROOT
from .kangaroo import generate_kangaroo, load_adapter
from .progress import Progress
from .unified import generate_unified

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
    model(torch.tensor([ids]), last_only=True)  # the prompt pass alone, to subtract
    t1 = time.perf_counter()
    with model.recording() as runs:
        tokens = fn(ids)
    secs = time.perf_counter() - t1 - (t1 - t0)
    L = model.cfg.n_layers
    layer_tokens = sum(r.n for r in runs if hasattr(r, "layer")) - L * len(ids)
    return tokens, layer_tokens, flops.total(model.cfg, runs) - flops.prefill_flops(model.cfg, len(ids)), secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=ROOT / "weights" / "smollm2-135m-instruct")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--json", help="also write the table as JSON here")
    a = ap.parse_args(argv)
    with torch.no_grad():
        return run(a)


def run(a):
    model, tok = load_model(a.model), load_tokenizer(a.model)
    chat = lambda q: tok.encode(chatml([{"role": "user", "content": q}]))  # noqa: E731
    N = a.max_new

    t0 = time.perf_counter()
    rows = [json.loads(line) for line in (DATA / "alpaca" / "alpaca_eval.jsonl").open()][:4]
    traces = [t for r in rows for t in generate_adainfer(model, chat(r["instruction"]), None, N, collect=True).traces]
    svm = SVM().fit(traces, "final")
    print(f"AdaInfer: SVM fitted on {len(traces)} token traces of 4 AlpacaEval answers "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    adapter = load_adapter(ROOT / "weights" / "kangaroo-l2", model)
    tuned = (ROOT / "weights" / "unified-2x" / "config.json").exists()
    unified_model = load_model(ROOT / "weights" / "unified-2x") if tuned else model

    methods = {
        "full": lambda ids: generate(model, [ids], max_new_tokens=N)[0],
        "AdaInfer (SVM)": lambda ids: generate_adainfer(model, ids, svm, N).tokens,
        "Kangaroo (l=2, top-4096 draft head)": lambda ids: generate_kangaroo(model, ids, adapter, max_new_tokens=N,
                                                                           draft_vocab=4096).tokens,
        f"Unified 2x ({'fine-tuned' if tuned else 'not fine-tuned'})":
            lambda ids: generate_unified(unified_model, [ids], 2, max_new_tokens=N)[0],
    }
    prompts = PROMPTS[:a.prompts]
    results, bar = [], Progress(len(prompts) * len(methods), "demo")
    for text in prompts:
        ids = chat(text)
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
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


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
