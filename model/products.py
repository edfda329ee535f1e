"""Matrix products x @ w.T of few rows, each routed to the BLAS routine that is fastest for it.

Products of few rows (decoding: 1; Kangaroo's verification: 2-8) are memory-bound, and which
routine reads the weights fastest depends on the CPU and on the shape: on one 2-core machine a
one-row GEMV runs on one core while a duplicated row buys the two-core path; on another the
duplicate costs 2.7x on a 576 x 576 weight. So each (rows, out, in, dtype) takes its route from
ROUTES, filled by tune_products() from timings of whole forward passes, else default_route().
Routes differ only in float rounding. `python -m skip.harness.bench_products` measures every
routine on every shape alone.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRODUCTS = {
    "linear": lambda x2, w: F.linear(x2, w),  # (rows, out)
    "transposed": lambda x2, w: (w @ x2.T).T,  # taken as (out, in) @ (in, rows)
    "dup": lambda x2, w: (w @ torch.cat([x2, x2]).T)[:, :1].T,  # one row twice: the 2-row path
}
ROUTES: dict[tuple, str] = {}
MAX_ROUTED = 8  # more rows: F.linear, a GEMM that is no longer memory-bound


def default_route(rows, w):
    """fp32 on the CPU, measured on SmolLM2, 2 threads (AMD EPYC), whole passes of `rows` new
    tokens: 1 row, the duplicate 51.7 ms against 62.2 with each product's fastest routine alone
    (mostly F.linear); 5 and 6 rows, w @ x.T 77.5 and 66.2 ms against 96.8 and 85.5 for F.linear.
    Other dtypes and devices: F.linear, as transformers computes it, so that bf16 and fp16 runs
    round exactly as transformers' do (tests/test_devices.py)."""
    if w.dtype != torch.float32 or w.device.type != "cpu":
        return "linear"
    return "dup" if rows == 1 else "transposed"


def linear(x, w, b=None):
    """x @ w.T + b, the product taken by the route of its shape."""
    rows = x.numel() // x.shape[-1]
    route = "linear" if rows > MAX_ROUTED else ROUTES.get((rows, *w.shape, w.dtype)) or default_route(rows, w)
    if route == "linear":
        return F.linear(x, w, b)
    y = PRODUCTS[route](x.reshape(rows, -1), w).contiguous().view(*x.shape[:-1], w.shape[0])  # (..., out)
    return y if b is None else y + b


def sync():
    """Wait for queued GPU work, so that a timer sees it (a no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def tune_products(model, rows=range(1, MAX_ROUTED + 1), reps=9, ctx=128):
    """For each row count, time a whole forward pass of that many tokens after ctx cached ones
    with every route in turn (median of reps, the routes taking turns) and keep the fastest in
    ROUTES for all the model's weight shapes. A whole pass, not each product alone: alone, a
    layer's weights stay in the cache, and the fastest routine there is not the fastest when
    the weights stream from memory. Returns {rows: (route, {route: ms})}."""
    shapes = {(*m.weight.shape, m.weight.dtype) for m in model.modules() if isinstance(m, nn.Linear)}
    dev, cache = model.device, model.new_cache(1, ctx + max(rows) + 1)
    model(torch.zeros(1, ctx, dtype=torch.long, device=dev), cache=cache, last_only=True)
    out = {}
    for n in rows:
        routes = [r for r in PRODUCTS if r != "dup" or n == 1]
        ids, times = torch.zeros(1, n, dtype=torch.long, device=dev), {r: [] for r in routes}
        for i in range(reps + 1):
            for r in routes:
                ROUTES.update({(n, *s): r for s in shapes})
                t0 = time.perf_counter()
                model(ids, cache=cache, start=ctx, last_only=True)
                sync()
                if i:  # the first round warms up
                    times[r].append(time.perf_counter() - t0)
                cache.crop(ctx)
        ms = {r: 1000 * statistics.median(t) for r, t in times.items()}
        best = min(ms, key=ms.get)
        ROUTES.update({(n, *s): best for s in shapes})
        out[n] = (best, ms)
    return out
