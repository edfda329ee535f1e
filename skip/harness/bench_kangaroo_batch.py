"""Batched Kangaroo (ours: skip/kangaroo.py's batch of prompts) on the Spec-Bench mix against plain
batched greedy decoding at the same batch size B, run through bench_kangaroo:

python -m skip.harness.bench_kangaroo --batch 1 2 4 8 [--prompts 8] [--max-new-tokens 24] [--repeats 2]
                                      [--policy row|batch_k|batch_stop]

The --prompts prompts are taken from the six categories in turn (so a batch mixes lengths) and
decode in consecutive batches of B, Kangaroo (adapter, top-K draft head) and plain batched
greedy decoding taking turns; each call's decode is timed alone (timing.DecodeClock: the prompt
pass is outside), the median of --repeats. Per B: decode tokens/s of both and their ratio;
whether every row's tokens equal plain's; the four acceptance metrics (skip/acceptance.py) over
all rows; the share of the verification a row did not need: idle = sum idle / positions
verified (a row's K + 1 a round), holes = sum holes / key slots before n (padding and the holes
of rejected drafts); and what explains the ratio: a plain step, a draft step (layers [0, l), A,
top-K head) and the deep pass on n positions, each timed at B rows, and the speedup they
predict from the batch's own rounds. Writes runs/bench-kangaroo-batch.json and .md.
"""
from __future__ import annotations

import statistics

from tqdm import tqdm

from model import generate
from model.jsonfile import read_json

from ..kangaroo_batch import generate_kangaroo_batch
from .data import specbench_mix
from .kangaroo_pieces import ACCEPTANCE_HEADERS, acceptance_cells, metrics, piece_costs, round_ms, yes_no
from .report import markdown_table, publish
from .runner import Contender, compare, settings


def batch_rounds(outs):
    """The batch's rounds from its rows' outputs (the rows start together and a row that stops
    leaves for good): per round, (K, rows in it), K the most any row drafted (drafted + idle)."""
    rounds = []
    for j in range(max(len(o.rounds) for o in outs)):
        rs = [o.rounds[j] for o in outs if j < len(o.rounds)]
        rounds.append((rs[0].drafted + rs[0].idle, len(rs)))
    return rounds


def waste(prompts, outs):
    """The shares of the batch's verification that a row did not need: idle = sum idle / positions
    verified (K + 1 a row and round); holes = sum holes / key slots before n (a row at slot n
    holds its prompt, its tokens but the newest, x, and its holes)."""
    idle = verified = holes = keys = 0
    for p, o in zip(prompts, outs):
        t = 1  # the prefill's token
        for r in o.rounds:
            idle, verified = idle + r.idle, verified + r.drafted + r.idle + 1
            holes, keys = holes + r.holes, keys + len(p) + t - 1 + r.holes
            t += r.accepted + 1
    return {"idle": idle / verified if verified else 0.0, "holes": holes / keys if keys else 0.0}


def measure(model, adapter, pool, B, a):
    """Both methods on the pool in batches of B: decode seconds, tokens, rounds, lossless."""
    N = a.max_new_tokens
    got = compare([Contender("plain", lambda ps: generate(model, ps, max_new_tokens=N), model),
                   Contender("kangaroo", lambda ps: generate_kangaroo_batch(
                       model, ps, adapter, max_new_tokens=N, gamma=a.gamma, eta=a.eta, draft_vocab=a.top_k,
                       policy=a.policy), model)],
                  [pool[i:i + B] for i in range(0, len(pool), B)], a.repeats)
    s = {m: sum(r.ms) / 1000 for m, r in got.items()}
    outs = [o for batch in got["kangaroo"].outputs for o in batch]
    plains = [t for batch in got["plain"].outputs for t in batch]
    rounds = [r for batch in got["kangaroo"].outputs for r in batch_rounds(batch)]
    plain_steps = sum(max(map(len, batch)) - 1 for batch in got["plain"].outputs)  # until its longest row is done
    return s, outs, plains, rounds, plain_steps, pool


def one_size(model, adapter, pool, B, a):
    s, outs, plains, rounds, plain_steps, prompts = measure(model, adapter, pool, B, a)
    decoded = {m: sum(len(t) - 1 for t in ts) for m, ts in (("plain", plains), ("kangaroo", [o.tokens for o in outs]))}
    ctx = int(statistics.mean(max(map(len, pool[i:i + B])) for i in range(0, len(pool), B))) + a.max_new_tokens // 2
    c = piece_costs(model, adapter, adapter.l, a.top_k, ctx, a.gamma, batch=B)
    tps = {m: decoded[m] / s[m] for m in s}
    return {"plain_tokens_per_s": tps["plain"], "kangaroo_tokens_per_s": tps["kangaroo"],
            "speedup": tps["kangaroo"] / tps["plain"],
            "predicted_speedup": plain_steps * c["step"] / sum(round_ms(K, c, c["draft_topk"]) for K, _ in rounds),
            "lossless": all(o.tokens == p for o, p in zip(outs, plains)),
            "rows_unequal": sum(o.tokens != p for o, p in zip(outs, plains)),
            "acceptance": metrics([(o.rounds, len(o.tokens)) for o in outs]),
            "waste": waste(prompts, outs), "batch_rounds": len(rounds), "plain_steps": plain_steps,
            "mean_K": statistics.mean(K for K, _ in rounds),
            "round_ms": statistics.mean(round_ms(K, c, c["draft_topk"]) for K, _ in rounds),
            "tokens_per_row_round": decoded["kangaroo"] / sum(n for _, n in rounds), "ctx": ctx, "costs_ms": c}


def reading(B, r, base):
    """One sentence: where the speedup at B stands and why, from the measured pieces."""
    c, K = r["costs_ms"], round(r["mean_K"])
    per_step = r["round_ms"] / c["step"]
    verdict = "below 1" if r["speedup"] < 1 else "above 1"
    return (f"B = {B}: speedup {r['speedup']:.2f}x ({verdict}; predicted {r['predicted_speedup']:.2f}x). A plain step "
            f"takes {c['step']:.1f} ms ({c['step'] / base:.2f}x the first size's); a round (mean K {r['mean_K']:.2f}: "
            f"draft steps of {c['shallow'] + c['draft_topk']:.1f} ms, the deep pass on {K + 1} positions "
            f"{c['verify'][K]:.1f} ms = {c['verify'][K] / c['step']:.2f} plain steps) "
            f"costs {per_step:.2f} plain steps; "
            f"a row commits {r['tokens_per_row_round']:.2f} tokens a round"
            + (", but the batch runs until its slowest row is done" if int(B) > 1 else "")
            + f", so a round replaces {r['plain_steps'] / r['batch_rounds']:.2f} plain steps; "
            f"{100 * r['waste']['idle']:.0f}% of the verified positions are idle rows', "
            f"{100 * r['waste']['holes']:.0f}% of the keys read are holes.")


def table(result):
    sizes = result["batches"]
    rows = [[B, r["plain_tokens_per_s"], r["kangaroo_tokens_per_s"], f"{r['speedup']:.2f}x",
             f"{r['predicted_speedup']:.2f}x", yes_no(r["lossless"]), *acceptance_cells(r["acceptance"]),
             f"{100 * r['waste']['idle']:.0f}%", f"{100 * r['waste']['holes']:.0f}%"] for B, r in sizes.items()]
    lines = ["Batched Kangaroo (top-K draft head) against plain batched greedy decoding, decode tokens/s:", "",
             markdown_table(rows, ["B", "plain tokens/s", "Kangaroo tokens/s", "speedup", "predicted", "= plain greedy",
                                   *ACCEPTANCE_HEADERS, "idle verified", "holes in keys"],
                            floatfmt=("", ".1f", ".1f", "", "", "", ".2f", "", ".3f", ".2f", "", ""))]
    pieces = [[B, r["costs_ms"]["step"], r["costs_ms"]["shallow"] + r["costs_ms"]["draft_topk"], r["mean_K"],
               r["costs_ms"]["verify"][round(r["mean_K"])], r["round_ms"] / r["costs_ms"]["step"],
               r["tokens_per_row_round"], r["plain_steps"] / r["batch_rounds"]] for B, r in sizes.items()]
    lines += ["", "Measured pieces at B rows (ms; no padding mask):", "", markdown_table(
        pieces, ["B", "plain step", "draft step (M^s + A + top-K head)", "mean K", "deep pass on K + 1",
                 "round / plain step", "tokens a row and round", "plain steps a batch round"],
        floatfmt=("", ".1f", ".1f", ".2f", ".1f", ".2f", ".2f", ".2f"))]
    base = next(iter(sizes.values()))["costs_ms"]["step"]
    lines += [""] + [reading(B, r, base) for B, r in sizes.items()]
    return "\n".join(lines) + "\n"


def bench_batch(model, tok, adapter, routes, a):
    pool = specbench_mix(tok, a.prompts)
    result = {"settings": settings(a),
              "adapter": read_json(a.adapter / "adapter.json", "adapter record", 1 << 20), "routes": routes,
              "prompt_lengths": list(map(len, pool)), "batches": {}}
    for B in tqdm(a.batch, desc="batch sizes"):
        result["batches"][B] = one_size(model, adapter, pool, B, a)
    publish(a.out, "bench-kangaroo-batch", result, table(result))
