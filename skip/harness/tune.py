"""Picking the product routes on the machine at hand, for a benchmark that asks for it.

model/products.py takes each product of few rows by a fixed rule per device and dtype. Which
routine is fastest depends on the CPU, so a speed benchmark may first time a whole forward pass
of n new tokens (after ctx cached ones) with every route in turn and keep the fastest per row
count; the table it returns is set on that model's Linear layers (and so changes only float
rounding there) and is recorded in the benchmark's output. A whole pass, not each product
alone: alone, a layer's weights stay in the cache, and the fastest routine there is not the
fastest when the weights stream from memory.
"""
from __future__ import annotations

import torch

from model.decoder import Linear
from model.products import MAX_ROUTED, PRODUCTS

from .timing import interleaved_ms


def set_routes(model, routes):
    """Use the route table on every Linear of the model (None: back to the fixed rule)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.routes = routes


@torch.inference_mode()
def tune_products(model, rows=range(1, MAX_ROUTED + 1), reps=9, ctx=128):
    """Time every route for each row count (median of reps, the routes taking turns), set the
    fastest on the model, and return {rows: (route, {route: ms})}."""
    shapes = {(*m.weight.shape, m.weight.dtype) for m in model.modules() if isinstance(m, Linear)}
    dev, cache = model.device, model.new_cache(1, ctx + max(rows) + 1)
    model(torch.zeros(1, ctx, dtype=torch.long, device=dev), cache=cache, last_only=True)
    table, out = {}, {}
    set_routes(model, table)
    for n in rows:
        routes = [r for r in PRODUCTS if r != "dup" or n == 1]
        ids = torch.zeros(1, n, dtype=torch.long, device=dev)

        def use(i, n=n, routes=routes):  # untimed: this contender's route, the cache back to ctx
            table.update({(n, *s): routes[i] for s in shapes})
            cache.crop(ctx)
        fns = [lambda: model(ids, cache=cache, start=ctx, last_only=True)] * len(routes)
        ms = dict(zip(routes, interleaved_ms(fns, reps, setup=use)))
        best = min(ms, key=ms.get)
        table.update({(n, *s): best for s in shapes})
        out[n] = (best, ms)
    return out


def tune(model):
    """tune_products as a speed benchmark runs it first: prints and returns what it chose."""
    res = tune_products(model)
    print("product routes tuned on this machine (rows: route; ms of a pass per route): " + "; ".join(
        f"{n}: {r} (" + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()) + ")" for n, (r, ms) in res.items()), flush=True)
    return {n: {"route": r, "ms": ms} for n, (r, ms) in res.items()}
