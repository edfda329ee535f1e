"""The confidence early-exit baseline (skip/baselines.py) with a full-head check at every layer
and with the cheap check (a head over frequent tokens, stops confirmed by the full head),
against plain decoding, each beside the speedup its own cost model predicts.

python -m skip.harness.bench_exit [--r 2] [--per-category 2] [--max-new-tokens 48] [--repeats 3] [--top-k 4096]

tau is calibrated for L / r layers per token on two math prompts, as in bench_skipping. The
cheap head holds the --top-k most frequent tokens of the model's own greedy answers to other
Spec-Bench prompts (the next --per-category of each category). Per prompt the methods take
turns, the median of --repeats runs each. Cost model: a plain step, one layer on one token, the
full head, the cheap head and one layer's K/V fill (state propagation) are timed alone at the
run's mean context; a method's predicted time per token is its recorded layer runs, head calls
and fills per token times those costs (plus the embedding, in the plain step's remainder), and
the predicted speedup is the plain step over that. Writes runs/bench-exit.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from model import add_load_args, generate, load_model, positions
from model.files import write_text_atomic
from model.flops import HeadRun, KVRun, LayerRun
from tokenizer import encode_chat, load_tokenizer

from .. import DEFAULT_MODEL, RUNS
from ..baselines import calibrate_threshold, generate_early_exit
from ..exit_decode import frequent_vocab
from .bench_decoder import tune
from .bench_kangaroo import median_ms, timed
from .data import SPECBENCH, specbench


@torch.inference_mode()
def piece_costs(model, vocab, ctx):
    """ms at context ctx: a plain decode step, one layer, the full head, the cheap head, a K/V fill."""
    L = model.cfg.n_layers
    cache, dev = model.new_cache(1, ctx + 2), model.device
    model(torch.zeros(1, ctx, dtype=torch.long, device=dev), cache=cache)
    pos, h = positions(None, ctx, 1, dev), torch.randn(1, 1, model.cfg.dim, dtype=model.dtype, device=dev)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)

    def then_crop(fn):
        def run():
            fn()
            cache.crop(ctx)
        return run
    return {"step": median_ms(then_crop(lambda: model(tok, cache=cache, start=ctx, last_only=True))),
            "layer": median_ms(then_crop(lambda: model.run_layers(h, pos, [L // 2], cache, ctx))),
            "head": median_ms(lambda: model.logits(h, last_only=True)),
            "cheap_head": median_ms(lambda: model.logits(h, last_only=True, vocab=vocab)),
            "fill": median_ms(then_crop(lambda: model.fill_kv(L - 1, h, pos, cache, ctx)))}


def counts(record, V):
    """Per-run totals of what a record spent after the prompt pass (the prompt pass is the
    record's leading full-width entries, the same for every method)."""
    first = next(i for i, r in enumerate(record) if isinstance(r, HeadRun))  # the prompt's head call
    rest = record[first + 1:]
    return {"layers": sum(isinstance(r, LayerRun) for r in rest),
            "heads": sum(isinstance(r, HeadRun) and r.vocab == V for r in rest),
            "cheap_heads": sum(isinstance(r, HeadRun) and r.vocab != V for r in rest),
            "fills": sum(isinstance(r, KVRun) for r in rest)}


def predicted_ms(c, costs, n_tok, L):
    """Per decoded token: the plain step's remainder (embedding, Python) plus every piece."""
    other = costs["step"] - L * costs["layer"] - costs["head"]
    return other + (c["layers"] * costs["layer"] + c["heads"] * costs["head"] + c["cheap_heads"] * costs["cheap_head"]
                    + c["fills"] * costs["fill"]) / n_tok


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--r", type=float, default=2.0, help="target speedup: tau is calibrated for L / r layers per token")
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=4096, help="tokens in the cheap head")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RUNS)
    add_load_args(ap)
    a = ap.parse_args(argv)
    if not (a.r >= 1 and a.per_category >= 1 and a.max_new_tokens >= 2 and a.repeats >= 1 and a.top_k >= 1):
        ap.error("need --r >= 1, --per-category, --repeats, --top-k >= 1 and --max-new-tokens >= 2")
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, a.dtype, device=a.device), load_tokenizer(a.model)
    routes = tune(model)
    L, V, N = model.cfg.n_layers, model.cfg.vocab_size, a.max_new_tokens
    both = {c: [encode_chat(tok, q) for q, _ in specbench(c, 2 * a.per_category)] for c in SPECBENCH}
    prompts = [p for ps in both.values() for p in ps[:a.per_category]]
    vocab_prompts = [p for ps in both.values() for p in ps[a.per_category:]]
    vocab = frequent_vocab(generate(model, vocab_prompts, max_new_tokens=N), n=a.top_k)
    calib = [encode_chat(tok, q) for q, _ in specbench("math_reasoning", 2)]
    tau = calibrate_threshold(model, calib, a.r, 24, 7)
    methods = {"plain": lambda p: generate(model, [p], max_new_tokens=N)[0],
               "early exit, full-head checks": lambda p: generate_early_exit(model, p, tau, N).tokens,
               f"early exit, top-{a.top_k} checks": lambda p: generate_early_exit(model, p, tau, N, vocab=vocab).tokens}
    prefill = lambda p: generate(model, [p], max_new_tokens=1)  # the prompt pass every method starts with
    raw = {m: {"ms": [], "tokens": [], "counts": []} for m in methods}
    for p in tqdm(prompts, desc="exit"):
        times, last = {m: [] for m in ["prefill", *methods]}, {}
        for _ in range(a.repeats):  # interleaved, so drifts of the machine hit every method
            times["prefill"].append(timed(lambda: prefill(p))[1])
            for m, fn in methods.items():
                with model.recording() as rec:  # appending a record entry per layer costs all methods alike
                    out, t = timed(lambda: fn(p))
                times[m].append(t)
                last[m] = (out, rec)
        for m, (out, rec) in last.items():  # decode time: the prompt pass's time subtracted
            raw[m]["ms"].append(1000 * (statistics.median(times[m]) - statistics.median(times["prefill"])))
            raw[m]["tokens"].append(out)
            raw[m]["counts"].append(counts(rec, V))
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
                   "layers_per_token": c["layers"] / fed, "heads_per_token": c["heads"] / fed,
                   "cheap_heads_per_token": c["cheap_heads"] / fed,
                   "equal_to_full_check": raw[m]["tokens"] == raw["early exit, full-head checks"]["tokens"],
                   "equal_to_plain": raw[m]["tokens"] == raw["plain"]["tokens"]}
    res = {"settings": {k: str(v) for k, v in vars(a).items()}, "tau": tau, "context": ctx, "costs_ms": costs,
           "routes": routes, "rows": rows}
    md = [f"tau {tau:.3f} (L / r = {L / a.r:.1f} layers per token on the calibration prompts); pieces at context "
          f"{ctx}, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()), "",
          "| method | layers / token | full heads / token | cheap heads / token | speedup | predicted | measured / "
          "predicted | = full-head check | = plain |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        same = ["-" if m == "plain" else "yes" if r[k] else "no" for k in ("equal_to_full_check", "equal_to_plain")]
        md.append(f"| {m} | {r['layers_per_token']:.1f} | {r['heads_per_token']:.1f} | {r['cheap_heads_per_token']:.1f} "
                  f"| {r['speedup']:.2f}x | {r['predicted']:.2f}x | {r['ratio']:.2f} | {same[0]} | {same[1]} |")
    a.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.out / "bench-exit.json", json.dumps(res, indent=1))
    write_text_atomic(a.out / "bench-exit.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
