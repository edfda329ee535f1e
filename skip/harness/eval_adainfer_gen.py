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
(the settings and the full model taking turns on each prompt; the decode alone, from the first
token fed back: timing.DecodeClock). Writes runs/adainfer-gen.json and .md.
"""
from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

from model import flops
from model.cli import command, float_in, positive
from tokenizer import encode_chat

from ..adainfer import SVM, Threshold
from ..adainfer_gen import generate_adainfer
from ..exit_decode import frequent_vocab
from .data import alpaca_instructions, specbench
from .report import markdown_table, publish, token_match
from .runner import Contender, compare, parser, settings, start

CATEGORIES = ("translation", "summarization", "qa", "math_reasoning", "rag")


def decode_flops(model, prompts, records):
    """The FLOPs recorded less the prompt passes' (the same for every setting)."""
    return sum(flops.total(model.cfg, rec) - flops.prefill_flops(model.cfg, len(p)) for p, rec in zip(prompts, records))


@command
@torch.no_grad()  # restores the grad mode on return: main may run inside a test
def main(argv=None):
    ap = parser(__doc__, threads=None)
    ap.add_argument("--n-train", type=positive, default=12)
    ap.add_argument("--n-test", type=positive, default=12)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--tau", type=float_in(0, 1), default=0.8, help="the gap threshold rule (paper: 0.8)")
    a = ap.parse_args(argv)
    if a.max_new < 2:
        ap.error("--max-new must be at least 2: the decode timed is that of the tokens fed back")
    from rouge_score import rouge_scorer  # the bench extra, needed past --help only

    model, tok = start(a)
    train = [generate_adainfer(model, encode_chat(tok, q), max_new_tokens=a.max_new, eos=[], collect=True)
             for q in tqdm(alpaca_instructions(a.n_train), desc="training traces")]
    svm = SVM().fit([t for g in train for t in g.traces], "final")
    cheap = frequent_vocab([g.tokens for g in train])
    per_cat = -(-a.n_test // len(CATEGORIES))
    test = [encode_chat(tok, q) for c in CATEGORIES for q, _ in specbench(c, per_cat)][:a.n_test]
    rules = [(f"gap>={a.tau}", Threshold(a.tau), 1, None, "propagate"), ("svm", svm, 1, None, "propagate"),
             ("svm", svm, 4, None, "propagate"), ("svm", svm, 1, cheap, "propagate"),
             ("svm", svm, 4, cheap, "propagate"), ("svm", svm, 4, cheap, "recompute")]

    def decode(**kw):
        return lambda ps: generate_adainfer(model, ps[0], max_new_tokens=a.max_new, eos=[], **kw)
    labels = [f"{name}, every {every}, {'full' if vocab is None else 'cheap'} head, {fill}"
              for name, _, every, vocab, fill in rules]
    # every setting and the full model take turns on each prompt; the decode alone is timed
    got = compare([Contender("full", decode(), model)]
                  + [Contender(label, decode(clf=clf, check_every=every, vocab=vocab, fill=fill), model)
                     for label, (_, clf, every, vocab, fill) in zip(labels, rules)],
                  [[p] for p in test], 1, record=True, desc="test prompts")
    full = got["full"].outputs
    full_flops = decode_flops(model, test, got["full"].records)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    results = []
    for label, (name, clf, every, vocab, fill) in zip(labels, rules):
        outs = got[label].outputs
        match = statistics.mean(token_match(o.tokens, f.tokens) for o, f in zip(outs, full))
        rouge = statistics.mean(scorer.score(tok.decode(f.tokens), tok.decode(o.tokens))["rougeL"].fmeasure
                                for o, f in zip(outs, full))
        layers = [e + 1 for o in outs for e in o.exit_layers]
        results.append({"rule": name, "check_every": every, "head": "full" if vocab is None else f"cheap {len(cheap)}",
                        "fill": fill, "token_match": match, "rougeL": 100 * rouge,
                        "avg_layers": statistics.fmean(layers),
                        "flops_ratio": decode_flops(model, test, got[label].records) / full_flops,
                        "wall_clock_ratio": sum(got[label].ms) / sum(got["full"].ms)})
    keys = ("rule", "check_every", "head", "fill", "token_match", "rougeL", "avg_layers", "flops_ratio", "wall_clock_ratio")
    lines = [markdown_table([[r[k] for k in keys] for r in results],
                            ["stop rule", "checks every", "head for checks", "fill", "token match", "ROUGE-L",
                             "avg layers", "FLOPs ratio", "wall-clock ratio"],
                            floatfmt=("", "", "", "", ".3f", ".1f", ".1f", ".2f", ".2f"))]
    publish(a.out, "adainfer-gen", {"args": settings(a), "results": results},
            "\n".join(lines))


if __name__ == "__main__":
    main()
