"""Matrix products x @ w.T of few rows, each routed to the BLAS routine that is fastest for it.

Products of few rows (decoding: 1; Kangaroo's verification: 2-8) are memory-bound, and which
routine reads the weights fastest depends on the CPU and on the shape: on one 2-core machine a
one-row GEMV runs on one core while a duplicated row buys the two-core path; on another the
duplicate costs 2.7x on a 576 x 576 weight. So each (rows, out, in, dtype) takes its route from
ROUTES, filled by tune_products() from timings, else default_route(). Routes differ only in
float rounding. `python -m skip.harness.bench_products` measures every routine on every shape.
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
MAX_ROUTED = 16  # more rows: F.linear, a compute-bound GEMM


def default_route(rows):
    return "dup" if rows == 1 else "transposed" if rows <= 4 else "linear"


def linear(x, w, b=None):
    """x @ w.T + b, the product taken by the route of its shape."""
    rows = x.numel() // x.shape[-1]
    route = "linear" if rows > MAX_ROUTED else ROUTES.get((rows, *w.shape, w.dtype)) or default_route(rows)
    if route == "linear":
        return F.linear(x, w, b)
    y = PRODUCTS[route](x.reshape(rows, -1), w).contiguous().view(*x.shape[:-1], w.shape[0])  # (..., out)
    return y if b is None else y + b


@torch.inference_mode()
def tune_products(model, rows=range(1, 9), reps=15):
    """Time every route on each of the model's weight shapes for each row count (median of reps,
    the routes taking turns) and keep the fastest in ROUTES; returns {key: (route, ms per route)}."""
    weights = {(*m.weight.shape, m.weight.dtype): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    out = {}
    for n in rows:
        for key, w in weights.items():
            x = torch.randn(n, w.shape[1], dtype=w.dtype, device=w.device)
            routes = [r for r in PRODUCTS if r != "dup" or n == 1]
            times = {r: [] for r in routes}
            for i in range(reps + 1):
                for r in routes:
                    t0 = time.perf_counter()
                    PRODUCTS[r](x, w)
                    if i:  # the first round warms up
                        times[r].append(time.perf_counter() - t0)
            ms = {r: 1000 * statistics.median(t) for r, t in times.items()}
            ROUTES[(n, *key)] = min(ms, key=ms.get)
            out[(n, *key)] = (ROUTES[(n, *key)], ms)
    return out
