"""Matrix products x @ w.T of few rows, each taken by a fixed rule per device and dtype.

Products of few rows (decoding: 1 row; Kangaroo's verification: 2-8) are memory-bound, and the
BLAS routine that reads the weights fastest depends on the shape: on the CPU a one-row GEMV
(what F.linear calls) runs on one core, while the same row given twice takes the two-row GEMM
path that uses every core; for 2-8 rows, w @ x.T (the weight as the left operand) reads it
faster than F.linear's x @ w.T. Which one-row route is fastest depends on the CPU: "dup" was
on AMD EPYC (35.8 ms for one SmolLM2 step's products against F.linear's 49.6,
docs/results-decoder.md), F.linear on Intel Xeon (15.3 ms against the duplicated row's 36.7,
MKL 2024.2), so the rule reads the CPU's vendor, which the machine fixes, never what ran before:
    fp32 on the CPU   1 row: "dup" on AMD, F.linear elsewhere   2-8 rows: "transposed"   more: F.linear
    a weight < 2^16   F.linear: it sits in a core's L2, so the extra ops of a route cost more than
                      they save (a 96x64 weight, one row, AMD EPYC: 3.9 us F.linear, 24.6 us "dup")
    anything else     F.linear, as transformers computes it (bf16 and fp16 round as its runs do)
On a CPU of neither vendor a row takes F.linear, the route whose worst case measured is the
smaller (1.39x the fastest on AMD, against the duplicate's 2.4x on Intel). Routes differ only in
float rounding. The measurements behind the rule, and a tuner that picks
the fastest route on the machine at hand for a benchmark, are in skip/harness/ (bench_products,
tune); a tuned table reaches a model only through a Linear's `routes`, which the model never sets.
"""
from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

PRODUCTS = {
    "linear": lambda x2, w: F.linear(x2, w),  # (rows, out)
    "transposed": lambda x2, w: (w @ x2.T).T,  # taken as (out, in) @ (in, rows)
    "dup": lambda x2, w: (w @ torch.cat([x2, x2]).T)[:, :1].T,  # one row twice: the 2-row path
}
MAX_ROUTED = 8  # more rows: F.linear, a GEMM that is no longer memory-bound
MIN_ROUTED = 2 ** 16  # smaller weights (256 KB in fp32, within a core's L2): F.linear, reading them is not the cost


def cpu_field(name):
    """A field of the kernel's /proc/cpuinfo for the first CPU ("vendor_id", "model name"), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_vendor():
    """The CPU's vendor as the kernel reports it ("AuthenticAMD", "GenuineIntel"), or "" unknown."""
    vendor = cpu_field("vendor_id") or platform.processor()
    return vendor if vendor in ("AuthenticAMD", "GenuineIntel") else ""


def route(rows, w, vendor=None):
    """The fixed rule: which of PRODUCTS takes a product of `rows` rows with weight w on a CPU of
    this vendor (default: this machine's, cpu_vendor())."""
    if rows > MAX_ROUTED or w.numel() < MIN_ROUTED or w.dtype != torch.float32 or w.device.type != "cpu":
        return "linear"
    if rows > 1:
        return "transposed"
    return "dup" if (cpu_vendor() if vendor is None else vendor) == "AuthenticAMD" else "linear"


def linear(x, w, b=None, routes=None):
    """x @ w.T + b, by the rule; routes: a tuned {(rows, out, in, dtype): route} that overrides it."""
    rows = x.numel() // x.shape[-1]
    name = (routes.get((rows, *w.shape, w.dtype)) if routes and rows <= MAX_ROUTED else None) or route(rows, w)
    if name == "linear":
        return F.linear(x, w, b)
    y = PRODUCTS[name](x.reshape(rows, -1), w).contiguous().view(*x.shape[:-1], w.shape[0])  # (..., out)
    return y if b is None else y + b

