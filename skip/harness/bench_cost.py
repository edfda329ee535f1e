"""Every method that decodes through fewer layers, against plain decoding, each beside the
speedup its own cost model predicts: Unified Layer Skipping and SkipDecode at target r, the
confidence early exit with a full-head check at every layer and with the cheap check (a head
over frequent tokens, stops confirmed by the full head), and AdaInfer for generation (the gap
rule, full-head and cheap checks). Kangaroo's own account is in bench_kangaroo.

python -m skip.harness.bench_cost [--r 2] [--per-category 2] [--max-new-tokens 48] [--repeats 3] [--top-k 4096]

Prompts: the Spec-Bench mix, --per-category per category. tau of the early exit is calibrated
for L / r layers per token on two math prompts, as in bench_skipping. The cheap heads hold the
--top-k most frequent tokens of the model's own greedy answers to other Spec-Bench prompts (the
next --per-category of each category). Per prompt the methods take turns, the median of
--repeats runs each, timing the decode alone (from the first token fed back: timing.DecodeClock).
Cost model: a plain step, a layer on one token and a layer's K/V fill (state propagation; both
as 1/L of all L in a row), the full head, the cheap head, AdaInfer's features of one check and
the early exit's decision on full-head logits (a softmax over the vocabulary), timed at the
run's mean context; a method's predicted time per token is what its run recorded (layer runs,
head calls, fills, checks) per token times those costs, plus the plain step's remainder
(embedding, sampling); the predicted speedup is the plain step over that. Quality beside it:
the share of generated tokens equal to plain decoding's, position by position, and whether
all are. Writes runs/bench-cost.{json,md}.
"""
from __future__ import annotations

import statistics

import torch

from model import generate, positions
from model.cli import command, r_and_top_k_within, float_in, int_in, positive
from model.flops import HeadRun, KVRun, LayerRun
from tokenizer import encode_chat

from ..adainfer import Threshold, feature_row
from ..adainfer_gen import generate_adainfer
from ..baselines import ConfidenceCheck, calibrate_threshold, generate_early_exit, generate_skipdecode
from ..exit_decode import frequent_vocab
from ..unified import generate_unified
from .data import SPECBENCH, specbench
from .report import markdown_table, publish, token_match
from .runner import Contender, compare, parser, settings, start
from .timing import median_ms
from .tune import tune


@torch.inference_mode()
def piece_costs(model, vocab, ctx):
    """ms at context ctx: a plain decode step, one layer, the full head, the cheap head, a K/V
    fill, the features of one AdaInfer check (from cheap-head logits), and the early exit's
    decision on full-head logits."""
    L = model.cfg.n_layers
    cache, dev = model.new_cache(1, ctx + 2), model.device
    model(torch.zeros(1, ctx, dtype=torch.long, device=dev), cache=cache)
    pos, h = positions(None, ctx, 1, dev), torch.randn(1, 1, model.cfg.dim, dtype=model.dtype, device=dev)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    lens, full = model.logits(h, last_only=True, vocab=vocab)[0, -1], model.logits(h, last_only=True)[0, -1]
    state = {"h": h[0, -1], "a": h[0, -1], "m": h[0, -1]}

    def then_crop(fn):
        def run():
            fn()
            cache.crop(ctx)
        return run
    # layers and fills are timed over all L in a row and divided by L: one layer timed alone keeps its
    # weights in the CPU's cache from one repetition to the next, while decoding streams them from memory
    return {"step": median_ms(then_crop(lambda: model(tok, cache=cache, start=ctx, last_only=True))),
            "layer": median_ms(then_crop(lambda: model.run_layers(h, pos, range(L), cache, ctx))) / L,
            "head": median_ms(lambda: model.logits(h, last_only=True)),
            "cheap_head": median_ms(lambda: model.logits(h, last_only=True, vocab=vocab)),
            "fill": median_ms(then_crop(lambda: [model.fill_kv(i, h, pos, cache, ctx) for i in range(L)])) / L,
            "features": median_ms(lambda: feature_row(lens, state, state)),
            "decision": median_ms(lambda: ConfidenceCheck(model, 0.5).confident(full))}


def counts(record, V, checks=0, exits=False):
    """Per-run totals of what a record spent after the prompt pass (the prompt pass is the
    record's leading full-width entries, the same for every method); checks: AdaInfer's; exits:
    the early exit's, which decides on every full-head call."""
    first = next(i for i, r in enumerate(record) if isinstance(r, HeadRun))  # the prompt's head call
    rest = record[first + 1:]
    heads = sum(isinstance(r, HeadRun) and r.vocab == V for r in rest)
    return {"layers": sum(isinstance(r, LayerRun) for r in rest), "heads": heads,
            "cheap_heads": sum(isinstance(r, HeadRun) and r.vocab != V for r in rest),
            "fills": sum(isinstance(r, KVRun) for r in rest), "checks": checks, "decisions": heads if exits else 0}


PIECE = {"layers": "layer", "heads": "head", "cheap_heads": "cheap_head", "fills": "fill", "checks": "features",
         "decisions": "decision"}


def predicted_ms(c, costs, n_tok, L):
    """Per decoded token: the plain step's remainder (embedding, sampling) plus every piece."""
    other = costs["step"] - L * costs["layer"] - costs["head"]
    return other + sum(c[k] * costs[PIECE[k]] for k in c) / n_tok


def contenders(model, a, tau, vocab):
    """Each method on one prompt (a batch of one): (new tokens, AdaInfer checks run)."""
    N, gap = a.max_new_tokens, Threshold(0.8)

    def ada(p, v):
        res = generate_adainfer(model, p, gap, N, vocab=v)
        return res.tokens, sum(len(c) for c in res.checks)
    fns = {"plain": lambda p: (generate(model, [p], max_new_tokens=N)[0], 0),
           f"Unified {a.r:g}x": lambda p: (generate_unified(model, [p], a.r, max_new_tokens=N)[0], 0),
           f"SkipDecode {a.r:g}x": lambda p: (generate_skipdecode(model, [p], a.r, max_new_tokens=N)[0], 0),
           "early exit, full-head checks": lambda p: (generate_early_exit(model, p, tau, N).tokens, 0),
           f"early exit, top-{a.top_k} checks":
               lambda p: (generate_early_exit(model, p, tau, N, vocab=vocab).tokens, 0),
           "AdaInfer gap>=0.8, full-head checks": lambda p: ada(p, None),
           f"AdaInfer gap>=0.8, top-{a.top_k} checks": lambda p: ada(p, vocab)}
    return [Contender(m, lambda ps, fn=fn: fn(ps[0]), model) for m, fn in fns.items()]


@command
@torch.no_grad()
def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--r", type=float_in(1), default=2.0, help="target speedup of Unified, SkipDecode and the early exit")
    ap.add_argument("--per-category", type=positive, default=2)
    ap.add_argument("--max-new-tokens", type=int_in(2), default=48)
    ap.add_argument("--repeats", type=positive, default=3)
    ap.add_argument("--top-k", type=positive, default=4096, help="tokens in the cheap heads")
    a = ap.parse_args(argv)
    r_and_top_k_within(ap, a)
    model, tok = start(a)
    routes = tune(model)
    L, V, N = model.cfg.n_layers, model.cfg.vocab_size, a.max_new_tokens
    both = {c: [encode_chat(tok, q) for q, _ in specbench(c, 2 * a.per_category)] for c in SPECBENCH}
    prompts = [p for ps in both.values() for p in ps[:a.per_category]]
    vocab_prompts = [p for ps in both.values() for p in ps[a.per_category:]]
    vocab = frequent_vocab(generate(model, vocab_prompts, max_new_tokens=N), n=a.top_k)
    calib = [encode_chat(tok, q) for q, _ in specbench("math_reasoning", 2)]
    tau = calibrate_threshold(model, calib, a.r, 24, 7)
    # the decode alone, from the first token fed back; a record of every call, for its counts
    got = compare(contenders(model, a, tau, vocab), [[p] for p in prompts], a.repeats, record=True, desc="cost")
    raw = {m: {"ms": r.ms, "tokens": [out for out, _ in r.outputs],
               "counts": [counts(rec, V, checks, m.startswith("early exit"))
                          for (_, checks), rec in zip(r.outputs, r.records)]} for m, r in got.items()}
    ctx = int(statistics.mean(len(p) for p in prompts)) + N // 2
    costs = piece_costs(model, vocab, ctx)
    per_token = {m: (sum(d["ms"]) / sum(len(t) - 1 for t in d["tokens"]),  # per token fed back
                     {k: sum(x[k] for x in d["counts"]) for k in d["counts"][0]}, sum(len(t) - 1 for t in d["tokens"]))
                 for m, d in raw.items()}
    plain_ms = per_token["plain"][0]
    pred_plain = predicted_ms(per_token["plain"][1], costs, per_token["plain"][2], L)
    rows = {}
    for m, (ms, c, fed) in per_token.items():
        measured, predicted = plain_ms / ms, pred_plain / predicted_ms(c, costs, fed, L)
        rows[m] = {"ms_per_token": ms, "speedup": measured, "predicted": predicted, "ratio": measured / predicted,
                   **{f"{k}_per_token": v / fed for k, v in c.items()},
                   "token_match": statistics.mean(token_match(o, f) for o, f in zip(raw[m]["tokens"], raw["plain"]["tokens"])),
                   "equal_to_plain": raw[m]["tokens"] == raw["plain"]["tokens"]}
    cheap = {f"{m}, top-{a.top_k} checks": raw[f"{m}, top-{a.top_k} checks"]["tokens"] == raw[f"{m}, full-head checks"]["tokens"]
             for m in ("early exit", "AdaInfer gap>=0.8")}
    res = {"settings": settings(a), "tau": tau, "context": ctx, "costs_ms": costs,
           "routes": routes, "rows": rows, "cheap_equals_full_check": cheap}
    write_report(res, a.out, L / a.r)


def write_report(res, out, budget):
    rows = [[m, r["layers_per_token"], r["heads_per_token"], r["cheap_heads_per_token"], r["fills_per_token"],
             f"{r['speedup']:.2f}x", f"{r['predicted']:.2f}x", r["ratio"], r["token_match"],
             "yes" if r["equal_to_plain"] else "no"] for m, r in res["rows"].items()]
    md = [f"Early exit: tau {res['tau']:.3f} ({budget:.1f} layers per token on the calibration prompts). "
          f"Pieces at context {res['context']}, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in res["costs_ms"].items()),
          "", markdown_table(rows, ["method", "layers / token", "full heads / token", "cheap heads / token",
                                    "K/V fills / token", "speedup", "predicted", "measured / predicted",
                                    "token match", "= plain"],
                             floatfmt=("", ".1f", ".1f", ".1f", ".1f", "", "", ".2f", ".3f", ""))]
    md += ["", "Tokens of the cheap checks equal to the full-head checks': "
           + ", ".join(f"{m}: {'yes' if same else 'no'}" for m, same in res["cheap_equals_full_check"].items())]
    publish(out, "bench-cost", res, "\n".join(md))


if __name__ == "__main__":
    main()
