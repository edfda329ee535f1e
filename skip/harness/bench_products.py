"""Matrix products of 1-16 rows on the model's real weight shapes: which routine reads the
weights fastest? Decoding multiplies 1 row (a token) and Kangaroo's verification 2-8 rows by
every weight matrix; both are memory-bound, so an ideal routine costs about the same for 1 row
as for 16 and reads the weights at the machine's streaming bandwidth.

python -m skip.harness.bench_products [--rows 1 2 4 8 16] [--runs 7] [--threads N]

Routines, each computing x @ w.T for x (n, in) and w (out, in):
  F.linear      torch.nn.functional.linear (what nn.Linear runs)
  w @ x.T       the product taken transposed: (out, in) @ (in, n)
  x @ wT        the weight stored transposed, (in, out), so the product is a plain (n, in) @ (in, out)
  dup row       one row duplicated so that MKL takes its two-row, multi-threaded path; else w @ x.T
  decoder       model.products.linear, the decoder's routing (untuned: its default routes)
Per shape (every distinct projection of a layer and the LM head) and row count: the median ms
of --runs interleaved runs, and the weight-reading rate in GB/s. The floor is a streaming read
of the same bytes (w.sum()). The totals weight each shape by how often one decode step runs it
(every layer's projections once, the head once).

Whole steps: alone, a layer's matrices stay in the L3 cache between repetitions, which flatters
some routines; so every product of one decode step is also timed in sequence, the weights
streaming from memory as in decoding, for 1, 2, 4 and 8 rows: each routine on the model's
layout, on a fused layout (q/k/v in one matrix and gate/up in another, 4 products per layer
instead of 7), and on one thread; beside a streaming read of the same weights. Writes
runs/bench-products.{json,md}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.cli import command, int_in, positive
from model.products import PRODUCTS, linear

from .bench_decoder import step_weights
from .report import markdown_table, publish
from .runner import parser, start
from .timing import interleaved_ms

_T = {}  # w -> w.T made contiguous once: the "stored transposed" layout (emptied per model)


def transposed(w):
    key = (w.data_ptr(), w.dtype, w.shape)
    if key not in _T:
        _T[key] = w.T.contiguous()  # (in, out)
    return _T[key]


ROUTINES = {  # the routes of model.products, and the stored-transposed layout it does not use
    "F.linear": PRODUCTS["linear"],
    "w @ x.T": PRODUCTS["transposed"],
    "x @ wT": lambda x, w: x @ transposed(w),
    "dup row": lambda x, w: PRODUCTS["dup" if x.shape[0] == 1 else "transposed"](x, w),
    "decoder": lambda x, w: linear(x, w),
}


def shapes(model):
    """Distinct (name, weight, uses per decode step) of the model's products."""
    block, out = model.blocks[0], {}
    for name, mod in [*block.attn.named_children(), *block.mlp.named_children()]:
        if isinstance(mod, torch.nn.Linear):
            out[name] = (mod.weight, model.cfg.n_layers)
    out["head"] = (model.head.weight, 1)
    return out


def bench(model, rows, runs):
    res = {}
    for name, (w, uses) in shapes(model).items():
        gb = w.numel() * w.element_size() / 1e9
        floor = interleaved_ms([lambda: w.sum()], runs)[0]
        res[name] = {"shape": list(w.shape), "uses": uses, "floor_ms": floor, "gb": gb, "rows": {}}
        for n in rows:
            x = torch.randn(n, w.shape[1], dtype=w.dtype, device=w.device)
            ref, tol = F.linear(x, w), 1e-4 if w.dtype == torch.float32 else 3e-2
            for fn in ROUTINES.values():  # every routine computes the same product
                torch.testing.assert_close(fn(x, w), ref, rtol=tol, atol=tol)
            ms = interleaved_ms([lambda f=f: f(x, w) for f in ROUTINES.values()], runs)
            res[name]["rows"][n] = dict(zip(ROUTINES, ms))
    return res


def layouts(model):
    """The weights of one decode step as the model stores them, and fused per layer."""
    fused = [w for b in model.blocks for w in (torch.cat([b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight]),
                                                b.attn.wo.weight, torch.cat([b.mlp.gate.weight, b.mlp.up.weight]),
                                                b.mlp.down.weight)]
    return {"separate": step_weights(model), "fused q/k/v, gate/up": fused + [model.head.weight]}


def whole_steps(model, rows, runs, threads):
    """ms of every product of one decode step in sequence, per layout, routine and row count."""
    lays, out = layouts(model), {}
    gb = sum(w.numel() * w.element_size() for w in lays["separate"]) / 1e9
    step = lambda ws, f, xs: [f(xs[w.shape[1]], w) for w in ws]
    for n in rows:
        xs = {k: torch.randn(n, k, dtype=model.dtype, device=model.device) for k in {w.shape[1] for w in lays["separate"]}}
        cases = {(lay, r): (ws, ROUTINES[r], threads) for lay, ws in lays.items() for r in ("F.linear", "w @ x.T", "dup row")
                 if r != "dup row" or n == 1}
        cases[("separate", "decoder, 1 thread")] = (lays["separate"], ROUTINES["decoder"], 1)

        def run(ws, f, t):
            torch.set_num_threads(t)
            step(ws, f, xs)
            torch.set_num_threads(threads)
        ms = interleaved_ms([lambda c=c: run(*c) for c in cases.values()], runs)
        out[n] = {f"{lay}: {r}": m for (lay, r), m in zip(cases, ms)}
    read = interleaved_ms([lambda: [w.sum() for w in lays["separate"]]], runs)[0]
    return {"gb": gb, "read_ms": read, "rows": out}


def whole_table(ws):
    names = list(ws["rows"][min(ws["rows"])])
    rows = [[n, *(f"{ms[k]:.1f} ({ws['gb'] / ms[k] * 1e3:.1f})" if k in ms else None for k in names)]
            for n, ms in ws["rows"].items()]
    return (f"Every product of one decode step in sequence ({ws['gb'] * 1e3:.0f} MB of weights streaming from memory), "
            f"ms (GB/s); a streaming read of the same weights: {ws['read_ms']:.1f} ms "
            f"({ws['gb'] / ws['read_ms'] * 1e3:.1f} GB/s):\n\n" + markdown_table(rows, ["rows", *names]))


def totals(res, rows):
    """ms of one decode step's products (each shape times its uses) per routine and row count."""
    out = {"floor": sum(r["floor_ms"] * r["uses"] for r in res.values())}
    for n in rows:
        out[n] = {k: sum(r["rows"][n][k] * r["uses"] for r in res.values()) for k in ROUTINES}
    return out


def table(res, rows):
    tot = totals(res, rows)
    rate = lambda ms, gb: f"{ms:.3f} ({gb / ms * 1e3:.1f})"
    per_shape = [[f"{name} {r['shape'][0]}x{r['shape'][1]}", n, *(rate(ms, r["gb"]) for ms in r["rows"][n].values()),
                  rate(r["floor_ms"], r["gb"])] for name, r in res.items() for n in rows]
    per_step = [[n, *(f"{tot[n][k]:.1f} ({tot[n][k] / tot[rows[0]][k]:.2f})" for k in ROUTINES)] for n in rows]
    return "\n".join([
        markdown_table(per_shape, ["shape", "rows", *(f"{k} ms (GB/s)" for k in ROUTINES), "floor ms (GB/s)"]), "",
        "One decode step's products (every shape times its uses), ms; ratio to 1 row in brackets:", "",
        markdown_table(per_step, ["rows", *ROUTINES]), f"\nStreaming read of the same weights: {tot['floor']:.1f} ms."])


@command
@torch.no_grad()
def main(argv=None):
    ap = parser(__doc__, threads=torch.get_num_threads())
    ap.add_argument("--rows", type=int_in(1, 64), nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8, 12, 16],
                    help="row counts, 1..64: products of few rows (more is a GEMM, not what this measures)")
    ap.add_argument("--runs", type=positive, default=7)
    a = ap.parse_args(argv)
    model = start(a, tokenizer=False)
    _T.clear()  # a freed weight's address may come back holding another
    res = bench(model, a.rows, a.runs)
    ws = whole_steps(model, [n for n in (1, 2, 4, 8) if n in a.rows] or a.rows[:1], a.runs, a.threads)
    md = table(res, a.rows) + "\n\n" + whole_table(ws)
    publish(a.out, "bench-products", {"threads": a.threads, "shapes": res, "totals": totals(res, a.rows),
                                      "whole_steps": ws}, md)


if __name__ == "__main__":
    main()
