"""Kangaroo on Spec-Bench against plain decoding and two self-speculative peers, all greedy, on
the same prompts and weights (SmolLM2-135M-Instruct), in one run.

python -m skip.harness.bench_kangaroo [--per-category 3] [--max-new-tokens 64] [--repeats 2] [--no-sweep]
python -m skip.harness.bench_kangaroo --batch 1 2 4 8 [--prompts 8]   (batched: bench_kangaroo_batch.py)
python -m skip.harness.bench_kangaroo --pool 1 2 4 8 [--prompts 64]   (a queue: bench_pool.py)

Rows: plain (this project's generate, the baseline); kangaroo (adapter at layer l, full head);
kangaroo-K (draft head on the adapter's K most frequent tokens, the documented extension);
lens (self-speculation from layer l with the model's own norm and head, no adapter); hf plain and
hf early-exit (transformers' generate, and with assistant_early_exit=l, drafting gamma tokens
with its confidence threshold at eta: the same budget as Kangaroo).
Per category: speedup = (tokens/s) / (plain tokens/s) over the category's prompts (as Spec-Bench
computes it; per prompt the median of --repeats runs, the methods taking turns), the four
acceptance metrics side by side as each peer defines them (skip/acceptance.py), decode FLOPs
per token from the decoder's record (all FLOPs but the plain prefill's, so Kangaroo's adapter
pass over the prompt counts), whether the tokens equal plain greedy decoding; and the speedup
that the measured rounds and the measured cost of each piece predict. The sweep varies l (lens
and any trained weights/kangaroo-l<l>), eta and gamma on one prompt per category, each point
beside whether its tokens equal plain greedy decoding's.
Writes runs/bench-kangaroo.json, runs/bench-kangaroo.md and runs/kangaroo.png.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from model import flops, generate
from model.cli import command, float_in, non_negative, positive
from model.jsonfile import read_json
from tokenizer import encode_chat

from .. import WEIGHTS
from ..kangaroo import generate_kangaroo
from ..kangaroo_batch import POLICIES
from ..kangaroo_files import load_adapter
from ..peer_layerskip import drafter_settings
from .bench_kangaroo_batch import bench_batch
from .bench_pool import bench_pool
from .data import SPECBENCH, specbench
from .kangaroo_pieces import ACCEPTANCE_HEADERS, acceptance_cells, metrics, piece_costs, predicted_speedup, yes_no
from .report import markdown_table, publish
from .runner import Contender, compare, parser, settings, start, tokens_of
from .timing import timed
from .tune import tune


def summarize(runs, plain_tps, costs=None, draft_ms=None):
    """runs: per prompt (tokens, seconds, rounds, flops, equal_to_plain)."""
    n_tok, secs = sum(len(r[0]) for r in runs), sum(r[1] for r in runs)
    rounds = [x for r in runs for x in (r[2] or [])]
    out = {"tokens": n_tok, "seconds": secs, "tokens_per_s": n_tok / secs, "lossless": all(r[4] for r in runs),
           "flops_per_token": sum(r[3] for r in runs) / n_tok if runs[0][3] is not None else None}
    out["speedup"] = out["tokens_per_s"] / plain_tps if plain_tps else 1.0
    if rounds:
        out["drafts_per_round"] = sum(r.drafted for r in rounds) / len(rounds)
        out["acceptance"] = metrics([(r[2], len(r[0])) for r in runs])
        if costs is not None:
            out["predicted_speedup"] = predicted_speedup(rounds, costs, draft_ms)
    return out


@command
def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--adapter", type=Path, default=WEIGHTS / "kangaroo-l2")
    ap.add_argument("--per-category", type=positive, default=3)
    ap.add_argument("--max-new-tokens", type=positive, default=64)
    ap.add_argument("--repeats", type=positive, default=2)
    ap.add_argument("--gamma", type=non_negative, default=6)
    ap.add_argument("--eta", type=float_in(0, 1), default=0.6)
    ap.add_argument("--top-k", type=positive, default=4096, help="K of the restricted draft head")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-repeats", type=positive, default=1)
    ap.add_argument("--batch", type=positive, nargs="+", help="batch sizes: the batched benchmark instead")
    ap.add_argument("--pool", type=positive, nargs="+", help="batch sizes: a queue of --prompts through B rows "
                    "against plain decoding's (bench_pool.py) instead")
    ap.add_argument("--prompts", type=positive, help="with --batch: prompts, a multiple of every B (default 8); "
                    "with --pool: the queue (default 64)")
    ap.add_argument("--policy", choices=POLICIES, default="row", help="with --batch: how many tokens each row drafts "
                    "(skip/kangaroo_batch.py; batch_k needs --eta 0)")
    ap.add_argument("--policies", choices=POLICIES, nargs="+", default=list(POLICIES),
                    help="with --pool: the policies to run (batch_k at eta 0)")
    a = ap.parse_args(argv)
    if a.batch and a.pool:
        ap.error("--batch and --pool are two benchmarks: give one")
    a.prompts = a.prompts or (64 if a.pool else 8)
    if a.pool and (len(set(a.pool)) < len(a.pool) or len(set(a.policies)) < len(a.policies)):
        ap.error("--pool and --policies list each size and policy once")
    if a.pool and a.max_new_tokens < 2:
        ap.error("--pool needs --max-new-tokens 2 or more: with 1 no decode step is left to time")
    if a.policies != list(POLICIES) and not a.pool:
        ap.error("--policies: the policies of the queue benchmark, for --pool")
    if a.policy != "row" and not a.batch:
        ap.error(f"--policy {a.policy}: a policy of the batch, for --batch")
    if a.policy == "batch_k" and a.eta != 0:
        ap.error(f"--policy batch_k drafts a fixed k without eta: give --eta 0, got {a.eta}")
    if a.batch and len(set(a.batch)) < len(a.batch):
        ap.error(f"--batch lists a size twice: {' '.join(map(str, a.batch))}")
    if (a.batch or a.pool) and a.prompts > (pool := sum(len(specbench(c)) for c in SPECBENCH)):
        ap.error(f"--prompts {a.prompts}: the Spec-Bench pool holds {pool}")
    if a.batch and any(a.prompts % B for B in a.batch):
        ap.error(f"--prompts {a.prompts} is not a multiple of every --batch {' '.join(map(str, a.batch))}")
    model, tok = start(a)
    adapter = load_adapter(a.adapter, model)
    if a.top_k > len(adapter.frequent):
        ap.error(f"--top-k {a.top_k}: the adapter in {a.adapter} ranks {len(adapter.frequent)} tokens")
    routes = tune(model)
    if a.batch:
        return bench_batch(model, tok, adapter, routes, a)
    if a.pool:
        return bench_pool(model, tok, adapter, routes, a)
    l, N = adapter.l, a.max_new_tokens
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(a.model, dtype=model.dtype).to(model.device).eval()
    prompts = {c: [encode_chat(tok, q) for q, _ in specbench(c, a.per_category)] for c in SPECBENCH}

    def ours(**kw):
        return lambda p: generate_kangaroo(model, p, max_new_tokens=N, gamma=a.gamma, eta=a.eta, **kw)

    def hf_run(**kw):  # the drafter reads gamma and eta from hf.generation_config, not from generate's arguments
        def fn(p):
            with torch.inference_mode(), drafter_settings(hf, a.gamma, a.eta):
                ids = hf.generate(torch.tensor([p], device=model.device), attention_mask=torch.ones(
                                  1, len(p), dtype=torch.long, device=model.device),
                                  max_new_tokens=N, do_sample=False, **kw)
            return ids[0, len(p):].tolist()
        return fn

    methods = {"plain": lambda p: generate(model, [p], max_new_tokens=N)[0],
               "kangaroo": ours(adapter=adapter), f"kangaroo-{a.top_k}": ours(adapter=adapter, draft_vocab=a.top_k),
               "lens": ours(l=l), "hf plain": hf_run(), "hf early-exit": hf_run(assistant_early_exit=l)}
    # the whole call timed (the transformers peers have no decode clock), each of ours recorded
    got = compare([Contender(m, lambda ps, fn=fn: fn(ps[0]), None if m.startswith("hf") else model)
                   for m, fn in methods.items()], [[p] for ps in prompts.values() for p in ps], a.repeats,
                  decode_only=False, record=True, desc="spec-bench")
    flat = [(c, p) for c, ps in prompts.items() for p in ps]
    raw = {c: {m: [] for m in methods} for c in prompts}
    for i, (c, p) in enumerate(flat):
        toks = {m: tokens_of(r.outputs[i]) for m, r in got.items()}
        for m, r in got.items():  # (tokens, seconds, rounds, decode FLOPs, = plain's tokens)
            rec = r.records[i]
            raw[c][m].append((toks[m], r.ms[i] / 1000, getattr(r.outputs[i], "rounds", None),
                              flops.total(model.cfg, rec) - flops.prefill_flops(model.cfg, len(p)) if rec else None,
                              toks[m] == toks["plain"]))
    ctx = int(statistics.mean(len(p) for ps in prompts.values() for p in ps)) + N // 2
    costs = piece_costs(model, adapter, l, a.top_k, ctx, a.gamma)
    draft_ms = {"kangaroo": costs["draft_full"], f"kangaroo-{a.top_k}": costs["draft_topk"], "lens": costs["lens_head"]}
    result = {"settings": settings(a),
              "adapter": read_json(a.adapter / "adapter.json", "adapter record", 1 << 20), "costs_ms": costs, "routes": routes,
              "categories": {}}
    for c in list(prompts) + ["overall"]:
        runs = raw[c] if c != "overall" else {m: [r for cc in prompts for r in raw[cc][m]] for m in methods}
        plain_tps = summarize(runs["plain"], None)["tokens_per_s"]
        result["categories"][c] = {m: summarize(runs[m], plain_tps, costs, draft_ms.get(m)) for m in methods}
    if not a.no_sweep:
        result["sweep"] = sweep(model, adapter, prompts, a, methods["plain"])
    publish(a.out, "bench-kangaroo", result, table(result))
    if "sweep" in result:
        plot(result["sweep"], a.out / "kangaroo.png")


def sweep(model, adapter, prompts, a, plain):
    """Speedup against l, eta and gamma on the first prompt of each category (best of --sweep-repeats;
    plain decoding timed before and after the sweep, the mean of the two is the baseline), and
    whether every output equals plain greedy decoding's."""
    ps, N = [v[0] for v in prompts.values()], a.max_new_tokens

    def best(**kw):
        """Summed over the prompts, the fastest of --sweep-repeats runs (ms); and the tokens."""
        fn = (lambda p: generate_kangaroo(model, p, max_new_tokens=N, **kw).tokens) if kw else plain
        runs = [[timed(lambda: fn(p)) for _ in range(a.sweep_repeats)] for p in ps]
        return sum(min(ms for _, ms in r) for r in runs), [r[0][0] for r in runs]

    others = {l: load_adapter(p, model) for l, p in
              ((int(p.name.split("-l")[1]), p) for p in WEIGHTS.glob("kangaroo-l*")) if p.is_dir()}
    points = [("eta", e, dict(adapter=adapter, draft_vocab=a.top_k, eta=e, gamma=a.gamma)) for e in (0.0, 0.2, 0.4, 0.6, 0.8)]
    points += [("gamma", g, dict(adapter=adapter, draft_vocab=a.top_k, eta=a.eta, gamma=g)) for g in (1, 2, 4, 6, 8)]
    points += [("l (lens)", l, dict(l=l, eta=a.eta, gamma=a.gamma)) for l in (1, 2, 4, 8, 16)]
    points += [("l (kangaroo-K)", l, dict(adapter=ad, draft_vocab=a.top_k, eta=a.eta, gamma=a.gamma))
               for l, ad in sorted(others.items())]
    bar, (t_plain, ref), runs = tqdm(total=len(points) + 2, desc="sweep"), best(), []
    for axis, value, kw in points:
        runs.append(best(**kw))
        bar.update()
    t_plain = (t_plain + best()[0]) / 2
    bar.update(2)
    bar.close()
    return [{"axis": axis, "value": value, "speedup": t_plain / t, "lossless": toks == ref}
            for (axis, value, _), (t, toks) in zip(points, runs)]


def table(result):
    cats = result["categories"]
    methods = list(cats["overall"])
    lines = ["Speedup over plain decoding (tokens/s ratio), beside whether every output equals plain greedy "
             "decoding's:", "",
             markdown_table([[m, *(f"{cats[c][m]['speedup']:.2f}x" for c in cats), yes_no(cats["overall"][m]["lossless"])]
                             for m in methods], ["method", *cats, "= plain greedy"])]
    rows = []
    for m, r in cats["overall"].items():
        pred = f"{r['predicted_speedup']:.2f}x" if r.get("predicted_speedup") else None
        fl = r["flops_per_token"] / 1e6 if r["flops_per_token"] else None
        acc = acceptance_cells(r["acceptance"]) if "acceptance" in r else [None] * 4
        rows.append([m, f"{r['speedup']:.2f}x", pred, r.get("drafts_per_round"), *acc, fl, yes_no(r["lossless"])])
    lines += ["", "All prompts (acceptance as each peer defines it: skip/acceptance.py):", "", markdown_table(
        rows, ["method", "speedup", "predicted", "drafts/round", *ACCEPTANCE_HEADERS, "decode MFLOPs/token",
               "= plain greedy"], floatfmt=("", "", "", ".2f", ".2f", "", ".3f", ".2f", ".0f", ""))]
    c = result["costs_ms"]
    lines += ["", f"Measured cost (ms): plain step {c['step']:.1f}, layers [0, l) {c['shallow']:.1f}, adapter + full head "
              f"{c['draft_full']:.1f}, adapter + top-K head {c['draft_topk']:.1f}, lens head {c['lens_head']:.1f}, "
              f"layers [l, L) + head on n = 1..{len(c['verify'])} tokens: " + " ".join(f"{v:.1f}" for v in c["verify"])
              + " (over the plain step: " + " ".join(f"{v / c['step']:.2f}" for v in c["verify"]) + ")"]
    if "sweep" in result:
        lines += ["", markdown_table([[s["axis"], str(s["value"]), f"{s['speedup']:.2f}x",
                                       yes_no(s["lossless"])] for s in result["sweep"]],
                                     ["sweep", "value", "speedup", "= plain greedy"])]
    return "\n".join(lines) + "\n"


def plot(points, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    axes = sorted({p["axis"] for p in points}, key=[p["axis"] for p in points].index)
    fig, ax = plt.subplots(1, len(axes), figsize=(3.2 * len(axes), 3), sharey=True)
    for i, axis in enumerate(axes):
        ps = [p for p in points if p["axis"] == axis]
        ax[i].plot([p["value"] for p in ps], [p["speedup"] for p in ps], "o-")
        ax[i].axhline(1.0, color="gray", lw=0.8)
        ax[i].set_xlabel(axis)
    ax[0].set_ylabel("speedup over plain decoding")
    fig.suptitle("Kangaroo on Spec-Bench (SmolLM2-135M, 2 CPU threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
