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
(the decode alone, from the first token fed back: timing.DecodeClock). Writes runs/adainfer-gen.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from model import add_load_args, flops, load_model
from model.cli import command, float_in, positive, writable_folder
from tokenizer import encode_chat, load_tokenizer

from .. import DEFAULT_MODEL, RUNS
from ..adainfer import SVM, Threshold
from ..adainfer_gen import generate_adainfer
from ..exit_decode import frequent_vocab
from .data import alpaca_instructions, specbench
from .report import markdown_table, publish, token_match
from .timing import timed_decode

CATEGORIES = ("translation", "summarization", "qa", "math_reasoning", "rag")


def run(model, prompts, max_new, **kw):
    """Outputs, decode FLOPs and decode seconds, summed over the prompts: the FLOPs recorded
    less the prompt pass's (the same for every setting), the time from the first token fed back."""
    outs, secs = [], 0.0
    with model.recording() as runs:
        for p in prompts:
            out, ms = timed_decode(model, lambda: generate_adainfer(model, p, max_new_tokens=max_new, eos=[], **kw))
            outs.append(out)
            secs += ms / 1000
    prefill = sum(flops.prefill_flops(model.cfg, len(p)) for p in prompts)
    return outs, flops.total(model.cfg, runs) - prefill, secs


@command
@torch.no_grad()  # restores the grad mode on return: main may run inside a test
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--n-train", type=positive, default=12)
    ap.add_argument("--n-test", type=positive, default=12)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--tau", type=float_in(0, 1), default=0.8, help="the gap threshold rule (paper: 0.8)")
    ap.add_argument("--out", type=Path, default=RUNS)
    add_load_args(ap)
    a = ap.parse_args(argv)
    if a.max_new < 2:
        ap.error("--max-new must be at least 2: the decode timed is that of the tokens fed back")
    writable_folder(a.out)
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
        match = statistics.mean(token_match(o.tokens, f.tokens) for o, f in zip(outs, full))
        rouge = statistics.mean(scorer.score(tok.decode(f.tokens), tok.decode(o.tokens))["rougeL"].fmeasure
                                for o, f in zip(outs, full))
        layers = [e + 1 for o in outs for e in o.exit_layers]
        results.append({"rule": name, "check_every": every, "head": "full" if vocab is None else f"cheap {len(cheap)}",
                        "fill": fill, "token_match": match, "rougeL": 100 * rouge,
                        "avg_layers": statistics.fmean(layers), "flops_ratio": fl / full_flops,
                        "wall_clock_ratio": secs / full_s})
        bar.set_postfix(rule=name, every=every, refresh=False)
        bar.update()
    bar.close()
    keys = ("rule", "check_every", "head", "fill", "token_match", "rougeL", "avg_layers", "flops_ratio", "wall_clock_ratio")
    lines = [markdown_table([[r[k] for k in keys] for r in results],
                            ["stop rule", "checks every", "head for checks", "fill", "token match", "ROUGE-L",
                             "avg layers", "FLOPs ratio", "wall-clock ratio"],
                            floatfmt=("", "", "", "", ".3f", ".1f", ".1f", ".2f", ".2f"))]
    a.out.mkdir(parents=True, exist_ok=True)
    publish(a.out, "adainfer-gen", {"args": {k: str(v) for k, v in vars(a).items()}, "results": results},
            "\n".join(lines))


if __name__ == "__main__":
    main()
