"""Kangaroo through a queue (ours: generate_kangaroo_batch's batch_size, model/queue.py) against the
same queue through plain decoding, as a server decodes: run through bench_kangaroo,

python -m skip.harness.bench_kangaroo --pool 1 2 4 8 [--prompts 64] [--max-new-tokens 32] [--repeats 1]
                                      [--policies row batch_stop batch_k]

The --prompts prompts (the Spec-Bench mix, its six categories in turn) wait in one queue; B rows
decode at once, and when a row ends (EOS or --max-new-tokens) the next prompt takes it. Per B, the
whole queue is timed (prefills included: a server's throughput), plain decoding (generate_queue)
and Kangaroo under each draft-length policy taking turns, the median of --repeats. batch_k drafts
a fixed k, so it runs at eta 0 (every other policy at --eta). Per B and policy: tokens/s and the
ratio to plain's; whether every prompt's tokens equal plain's; the acceptance metrics; the passes
of each (plain steps, Kangaroo rounds) and the row slots they left idle (rows without a prompt
once the queue is empty); idle verified positions and holes among the keys (as
bench_kangaroo_batch); and what the ratio needs: a round's measured cost in plain steps at B
(its pieces timed at B rows, three times, the median), against the tokens a row commits per round.
Writes runs/bench-kangaroo-pool.json and .md.
"""
from __future__ import annotations

import statistics

from tqdm import tqdm

from model import generate_queue
from model.jsonfile import read_json

from ..kangaroo_batch import generate_kangaroo_batch
from .bench_kangaroo_batch import waste
from .data import specbench_mix
from .kangaroo_pieces import ACCEPTANCE_HEADERS, acceptance_cells, metrics, piece_costs, round_ms, yes_no
from .report import markdown_table, publish
from .runner import Contender, compare, settings


PIECE_RUNS = 3  # measurements of a round's pieces per batch size


def schedule(counts, B):
    """The batch passes of a queue through B rows (model/queue.py's rule): per pass, the (prompt,
    its pass index) of every row in it; counts: each prompt's passes (a prompt of none ends at its
    prefill and gives its row on, so it is skipped here). Each pass holds the same prompts as the
    real loop's; their order within a pass may differ, and nothing here reads it."""
    queue, done, passes = [r for r in range(len(counts)) if counts[r]], [0] * len(counts), []
    rows = queue[:B]
    del queue[:B]
    while rows:
        passes.append([(r, done[r]) for r in rows])
        for r in rows:
            done[r] += 1
        rows = [r if done[r] < counts[r] else (queue.pop(0) if queue else None) for r in rows]
        rows = [r for r in rows if r is not None]
    return passes


def kangaroo_passes(outs, B):
    """Each batch round's K (the most any row drafted: a row's drafted + idle) and rows in it;
    checks that every row of a round agrees on K, which binds the schedule to the run."""
    passes = []
    for rnd in schedule([len(o.rounds) for o in outs], B):
        Ks = {outs[r].rounds[j].drafted + outs[r].rounds[j].idle for r, j in rnd}
        assert len(Ks) == 1, f"the rows of one round disagree on its K: {Ks}"
        passes.append((Ks.pop(), len(rnd)))
    return passes


def one_size(model, adapter, pool, B, a):
    N = a.max_new_tokens
    contenders = [Contender("plain", lambda ps: generate_queue(model, ps, B, max_new_tokens=N), model)] + [
        Contender(p, lambda ps, p=p: generate_kangaroo_batch(
            model, ps, adapter, max_new_tokens=N, gamma=a.gamma, eta=0.0 if p == "batch_k" else a.eta,
            draft_vocab=a.top_k, policy=p, batch_size=B), model) for p in a.policies]
    got = compare(contenders, [pool], a.repeats, decode_only=False)
    plain = got["plain"].outputs[0]
    tokens = sum(map(len, plain))
    plain_steps = len(schedule([len(t) - 1 for t in plain], B))
    ctx = int(statistics.mean(map(len, pool))) + N // 2
    # the pieces PIECE_RUNS times: a step and a deep pass timed apart drift apart on a shared machine, so
    # a round's cost in plain steps is taken within each measurement, then the median of them
    costs = [piece_costs(model, adapter, adapter.l, a.top_k, ctx, a.gamma, batch=B) for _ in range(PIECE_RUNS)]
    res = {"plain_tokens_per_s": 1000 * tokens / got["plain"].ms[0], "plain_steps": plain_steps,
           "plain_idle_slots": 1 - sum(len(t) - 1 for t in plain) / (B * plain_steps), "costs_ms": costs,
           "step_ms": statistics.median(c["step"] for c in costs), "ctx": ctx, "policies": {}}
    for p in a.policies:
        outs = got[p].outputs[0]
        passes = kangaroo_passes(outs, B)
        rounds, made = sum(n for _, n in passes), sum(len(o.tokens) for o in outs)
        res["policies"][p] = {
            "tokens_per_s": 1000 * made / got[p].ms[0],
            "speedup": got["plain"].ms[0] / got[p].ms[0] * made / tokens,
            "lossless": all(o.tokens == t for o, t in zip(outs, plain)),
            "acceptance": metrics([(o.rounds, len(o.tokens)) for o in outs]),
            "batch_rounds": len(passes), "idle_slots": 1 - rounds / (B * len(passes)),
            "waste": waste(pool, outs), "mean_K": statistics.mean(K for K, _ in passes),
            "round_steps": statistics.median(statistics.mean(round_ms(K, c, c["draft_topk"]) for K, _ in passes)
                                             / c["step"] for c in costs),
            "tokens_per_row_round": sum(len(o.tokens) - 1 for o in outs) / rounds}
        k = res["policies"][p]  # the decode alone: the queue's plain steps against its rounds, at the pieces' costs
        k["predicted_decode"] = plain_steps / (len(passes) * k["round_steps"])
    return res


def table(result):
    rows, pieces = [], []
    for B, r in result["sizes"].items():
        rows.append([B, "plain", r["plain_tokens_per_s"], "1.00x", "yes", "", "", "", "", r["plain_steps"],
                     f"{100 * r['plain_idle_slots']:.0f}%", "", ""])
        for p, k in r["policies"].items():
            rows.append([B, p, k["tokens_per_s"], f"{k['speedup']:.2f}x", yes_no(k["lossless"]),
                         *acceptance_cells(k["acceptance"]), k["batch_rounds"], f"{100 * k['idle_slots']:.0f}%",
                         f"{100 * k['waste']['idle']:.0f}%", f"{100 * k['waste']['holes']:.0f}%"])
            pieces.append([B, p, r["step_ms"], k["mean_K"], k["round_steps"], k["tokens_per_row_round"],
                           r["plain_steps"] / k["batch_rounds"], f"{k['predicted_decode']:.2f}x", f"{k['speedup']:.2f}x"])
    lines = [f"A queue of {len(result['prompt_lengths'])} Spec-Bench prompts through B rows, the whole queue timed "
             "(prefills included):", "",
             markdown_table(rows, ["B", "decoding", "tokens/s", "speedup", "= plain greedy", *ACCEPTANCE_HEADERS,
                                   "passes", "row slots idle", "idle verified", "holes in keys"],
                            floatfmt=("", "", ".1f", "", "", ".2f", "", ".3f", ".2f", "", "", "", "")),
             "", f"What the ratio needs: a round's cost in plain steps at B (its pieces timed at B rows, no mask; "
             f"the median of {PIECE_RUNS} measurements), "
             "against the tokens a row commits a round and the plain steps a batch round replaces:", "",
             markdown_table(pieces, ["B", "policy", "plain step (ms)", "mean K", "round / plain step",
                                     "tokens a row and round", "plain steps a batch round",
                                     "predicted (decode alone)", "measured (whole queue)"],
                            floatfmt=("", "", ".1f", ".2f", ".2f", ".2f", ".2f", "", ""))]
    return "\n".join(lines) + "\n"


def bench_pool(model, tok, adapter, routes, a):
    pool = specbench_mix(tok, a.prompts)
    result = {"settings": settings(a), "adapter": read_json(a.adapter / "adapter.json", "adapter record", 1 << 20),
              "routes": routes, "prompt_lengths": list(map(len, pool)), "sizes": {}}
    for B in tqdm(a.pool, desc="batch sizes"):
        result["sizes"][B] = one_size(model, adapter, pool, B, a)
    publish(a.out, "bench-kangaroo-pool", result, table(result))
