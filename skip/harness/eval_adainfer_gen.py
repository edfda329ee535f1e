"""AdaInfer for generation on Spec-Bench prompts: FLOPs and wall-clock against agreement with
the full model's greedy output.

python -m skip.harness.eval_adainfer_gen [--n-train 12] [--n-test 12] [--max-new 32]

Training (AlpacaEval instructions, never Spec-Bench): the full model's greedy answers are
traced token by token (every layer's features, full head); an SVM is fitted with the "final"
label rule (stopping is right where the layer's top-1 equals the full model's), and the 2048
most frequent output tokens make the cheap head. Test: Spec-Bench prompts from every
category; each setting (stop rule x check schedule x head x fill) against the full model:
token match rate (position by position), ROUGE-L of the decoded texts, FLOPs ratio of the
decode steps from the decoder's record, wall-clock ratio of the decode steps in the same run
(the prompt pass, identical for all, timed alone and subtracted). Writes runs/adainfer-gen.json and .md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model import add_load_args, flops, load_model
from model.files import write_text_atomic
from model.products import sync
from tokenizer import encode_chat, load_tokenizer

from .. import DEFAULT_MODEL, RUNS
from ..adainfer import SVM, Threshold
from ..adainfer_gen import generate_adainfer
from ..exit_decode import frequent_vocab
from .data import alpaca_instructions, specbench

CATEGORIES = ("translation", "summarization", "qa", "math_reasoning", "rag")


def run(model, prompts, max_new, **kw):
    """Outputs, decode FLOPs and seconds: the prompt pass, the same for every setting, is
    subtracted from both (timed alone; its FLOPs from the formula, twice: timed run and generate)."""
    outs, secs = [], 0.0
    with model.recording() as runs:
        for p in prompts:
            t0 = time.perf_counter()
            model(torch.tensor([p], device=model.device), last_only=True)
            sync()
            t1 = time.perf_counter()
            outs.append(generate_adainfer(model, p, max_new_tokens=max_new, eos=[], **kw))
            secs += time.perf_counter() - t1 - (t1 - t0)
    prefill = sum(2 * flops.prefill_flops(model.cfg, len(p)) for p in prompts)
    return outs, flops.total(model.cfg, runs) - prefill, secs


@torch.no_grad()  # restores the grad mode on return: main may run inside a test
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--n-train", type=int, default=12)
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.8, help="the gap threshold rule (paper: 0.8)")
    ap.add_argument("--out", type=Path, default=RUNS)
    add_load_args(ap)
    a = ap.parse_args(argv)
    from rouge_score import rouge_scorer  # the bench extra, needed past --help only

    model, tok = load_model(a.model, a.dtype, device=a.device), load_tokenizer(a.model)
    train, _, _ = run(model, [encode_chat(tok, q) for q in alpaca_instructions(a.n_train)], a.max_new, collect=True)
    svm = SVM().fit([t for g in train for t in g.traces], "final")
    cheap = frequent_vocab([g.tokens for g in train])
    per_cat = -(-a.n_test // len(CATEGORIES))
    test = [encode_chat(tok, q) for c in CATEGORIES for q, _ in specbench(c, per_cat)][:a.n_test]
    full, full_flops, full_s = run(model, test, a.max_new)
    settings = [(f"gap>={a.tau}", Threshold(a.tau), 1, None, "propagate"), ("svm", svm, 1, None, "propagate"),
                ("svm", svm, 4, None, "propagate"), ("svm", svm, 1, cheap, "propagate"),
                ("svm", svm, 4, cheap, "propagate"), ("svm", svm, 4, cheap, "recompute")]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    results, bar = [], tqdm(total=len(settings), desc="settings")
    for name, clf, every, vocab, fill in settings:
        outs, fl, secs = run(model, test, a.max_new, clf=clf, check_every=every, vocab=vocab, fill=fill)
        match = statistics.mean(sum(x == y for x, y in zip(o.tokens, f.tokens)) / len(f.tokens) for o, f in zip(outs, full))
        rouge = statistics.mean(scorer.score(tok.decode(f.tokens), tok.decode(o.tokens))["rougeL"].fmeasure
                                for o, f in zip(outs, full))
        layers = [e + 1 for o in outs for e in o.exit_layers]
        results.append({"rule": name, "check_every": every, "head": "full" if vocab is None else f"cheap {len(cheap)}",
                        "fill": fill, "token_match": match, "rougeL": 100 * rouge,
                        "avg_layers": statistics.mean(layers), "flops_ratio": fl / full_flops,
                        "wall_clock_ratio": secs / full_s})
        bar.set_postfix(rule=name, every=every, refresh=False)
        bar.update()
    bar.close()
    lines = ["| stop rule | checks every | head for checks | fill | token match | ROUGE-L | avg layers | FLOPs ratio | "
             "wall-clock ratio |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['check_every']} | {r['head']} | {r['fill']} | {r['token_match']:.3f} | "
              f"{r['rougeL']:.1f} | {r['avg_layers']:.1f} | {r['flops_ratio']:.2f} | {r['wall_clock_ratio']:.2f} |"
              for r in results]
    a.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.out / "adainfer-gen.json",
                      json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=1))
    write_text_atomic(a.out / "adainfer-gen.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
