"""Decoder speed: this decoder against transformers on the same weights, in the same run; and
the peak memory of loading it.

python -m skip.harness.bench_decoder [--runs 5] [--threads N] [--memory-only]
Prefill (ms) at prompt lengths 128 and 512; decode (ms/token) at contexts 128 and 1024; the
median of --runs runs each; ratio = ours / transformers. The "matmul floor" is the time of
only the matrix products of one decode step (every projection of every layer and the LM head,
on the same weights): no attention, no norms, no Python loop around the model; once as the
decoder takes them (model.products.linear) and once as bare one-row F.linear calls, the
single-core GEMV that transformers runs. Memory: peak resident memory of load_model in fp32
and bf16, each in a fresh interpreter, against the bytes of the loaded weights.
Writes runs/bench-decoder.json and a markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from model import add_load_args, load_model
from model.cli import command, positive, threads, writable_file
from model.products import linear
from weights.files import check_not_reading, write_text_atomic

from .. import DEFAULT_MODEL, RUNS
from .report import RESULT, markdown_table, record
from .timing import interleaved_ms, timed
from .tune import tune

DECODE_STEPS = 16


class Ours:
    def __init__(self, model, max_len):
        self.model, self.cache = model, model.new_cache(1, max_len)

    def prefill(self, ids):
        self.cache.crop(0)
        self.model(ids, cache=self.cache, last_only=True)

    def decode(self, tok, n):
        start = self.cache.lengths[0]
        for i in range(n):
            self.model(tok, cache=self.cache, start=start + i, last_only=True)

    def crop(self, n):
        self.cache.crop(n)


class Transformers:
    def __init__(self, model):
        from transformers import DynamicCache
        self.model, self.new_cache, self.cache = model, lambda: DynamicCache(config=model.config), None

    def prefill(self, ids):
        self.cache = self.new_cache()
        self.model(ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def decode(self, tok, n):
        for _ in range(n):
            self.model(tok, past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def crop(self, n):
        self.cache.crop(n - self.cache.get_seq_length())  # transformers 5 takes "tokens to remove" (<= 0)


OP_GROUPS = {  # aten op -> what it is for, in the profile of a decode step
    "matrix products": {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"},
    "attention kernel": {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"},
    "copies, cat, allocation, views": {
        "aten::cat", "aten::copy_", "aten::clone", "aten::contiguous", "aten::empty", "aten::empty_like",
        "aten::empty_strided", "aten::as_strided", "aten::view", "aten::slice", "aten::permute", "aten::transpose",
        "aten::reshape", "aten::narrow", "aten::numpy_T", "aten::t", "aten::expand", "aten::select", "aten::unsqueeze",
        "aten::to", "aten::_to_copy", "aten::chunk", "aten::split", "aten::_unsafe_view", "aten::detach",
        "aten::alias", "aten::index", "aten::index_put_", "aten::slice_scatter", "aten::resize_"},
}


@torch.inference_mode()
def profile_decode(model, ctx, steps=8):
    """Where a decode step's time goes, by torch.profiler: each op's own (self) CPU time summed
    per group of OP_GROUPS, the rest as "norms, RoPE, elementwise"; what the profiled wall time
    holds beyond every op's own time is Python and dispatch between ops (the profiler's own
    cost included: the unprofiled step is given beside it). ms per step."""
    from torch.profiler import ProfilerActivity, profile

    cache, tok = model.new_cache(1, ctx + 1), torch.zeros(1, 1, dtype=torch.long, device=model.device)
    model(torch.zeros(1, ctx, dtype=torch.long, device=model.device), cache=cache)

    def step():
        model(tok, cache=cache, start=ctx, last_only=True)
        cache.crop(ctx)
    plain = interleaved_ms([step], steps)[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = timed(lambda: [step() for _ in range(steps)])[1] / steps  # the mean, as the op times below
    groups, ops = {g: 0.0 for g in [*OP_GROUPS, "norms, RoPE, elementwise"]}, 0
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        g = next((g for g, names in OP_GROUPS.items() if e.key in names), "norms, RoPE, elementwise")
        groups[g] += e.self_cpu_time_total / 1000 / steps
        ops += e.count / steps
    groups["Python and dispatch between ops"] = wall - sum(groups.values())
    return {"context": ctx, "step_ms": plain, "profiled_step_ms": wall, "aten_ops_per_step": ops, "groups_ms": groups}


def step_weights(model):
    """The weights one decode step multiplies by, in order: every layer's projections, the head."""
    return [m.weight for blk in model.blocks for m in
            (blk.attn.wq, blk.attn.wk, blk.attn.wv, blk.attn.wo, blk.mlp.gate, blk.mlp.up, blk.mlp.down)] + [model.head.weight]


def matmul_floor_ms(model, runs, product):
    """Only the matrix products of one decode step, on the model's own weights."""
    mats = step_weights(model)
    xs = {w.shape[1]: torch.randn(1, 1, w.shape[1], dtype=w.dtype, device=w.device) for w in mats}

    def step():
        for w in mats:
            product(xs[w.shape[1]], w)
    return interleaved_ms([step], runs * 4)[0]


LOAD_PROBE = """
import sys
import torch
from model import load_model
def status(field):  # bytes; /proc reports kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
with torch.device("meta"):  # the first meta-device module imports torch's meta kernels: once per process
    torch.nn.Embedding(2, 2)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: a child starts with its parent's
before = status("VmRSS:")
m = load_model(sys.argv[1], dtype=sys.argv[2])
weights = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in m.state_dict().values()}.values())
print(before, status("VmHWM:"), weights)
"""


def load_memory(model_dir, dtype):
    """Peak resident memory of load_model in a fresh interpreter, in bytes: before loading (the
    interpreter, torch, and torch's meta kernels, which the first meta-device module imports
    once per process whatever the model), the peak after, and the loaded weights' bytes."""
    import subprocess
    import sys
    from .. import ROOT
    p = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(model_dir), dtype], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode:  # the model's own error, as the child reported it
        raise ValueError(f"loading {model_dir} in the memory probe failed: {(p.stderr.strip() or '?').splitlines()[-1]}")
    out = p.stdout.split()
    before, after, weights = map(int, out[-3:])
    return {"dtype": dtype, "before": before, "peak": after, "weights": weights,
            "peak_over_weights": (after - before) / weights}


@torch.inference_mode()
def bench(model_dir, runs, threads, dtype="float32", device="cpu"):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    ours = load_model(model_dir, dtype, device=device)
    floor_untuned = matmul_floor_ms(ours, runs, linear)
    routes = tune(ours)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=ours.dtype).to(ours.device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, ours.cfg.vocab_size, (1, 1024 + DECODE_STEPS), generator=g).to(ours.device)
    impls = [Ours(ours, ids.shape[1]), Transformers(hf)]
    rows = [{"impl": "ours"}, {"impl": "transformers"}]
    for T in (128, 512):
        ms = interleaved_ms([lambda impl=impl: impl.prefill(ids[:, :T]) for impl in impls], runs)
        for r, m in zip(rows, ms):
            r[f"prefill_{T}_ms"] = m
    for S in (128, 1024):
        for impl in impls:
            impl.prefill(ids[:, :S])
        tok = ids[:, S:S + 1]
        ms = interleaved_ms([lambda impl=impl: impl.decode(tok, DECODE_STEPS) for impl in impls], runs,
                            setup=lambda i: impls[i].crop(S))
        for r, m in zip(rows, ms):
            r[f"decode_{S}_ms_per_token"] = m / DECODE_STEPS
        print(json.dumps(rows), flush=True)
    ours_r, hf_r = rows
    ratios = {k: ours_r[k] / hf_r[k] for k in ours_r if k != "impl"}
    floor, gemv = matmul_floor_ms(ours, runs, linear), matmul_floor_ms(ours, runs, F.linear)
    read = matmul_floor_ms(ours, runs, lambda x, w: w.sum())  # every weight read once: the bandwidth floor
    memory = [load_memory(model_dir, d) for d in ("float32", "bfloat16")]
    return {"model": str(model_dir), "dtype": dtype, "device": str(ours.device), "threads": threads, "runs": runs,
            "decode_steps": DECODE_STEPS, "load_memory": memory, "profile": profile_decode(ours, 128),
            "routes": routes, "matmul_floor_untuned_ms": floor_untuned,
            "torch": torch.__version__, "results": rows, "ratio_ours_over_transformers": ratios,
            "matmul_floor_ms": floor, "gemv_floor_ms": gemv, "read_floor_ms": read,
            "ours_decode_128_over_read_floor": ours_r["decode_128_ms_per_token"] / read,
            "ours_decode_128_over_matmul_floor": ours_r["decode_128_ms_per_token"] / floor}


def table(res) -> str:
    memory = markdown_table(
        [[m["dtype"], m["weights"] / 1e6, m["before"] / 1e6, m["peak"] / 1e6, m["peak_over_weights"]]
         for m in res.get("load_memory", [])],
        ["load_model", "weights (MB)", "before loading (MB)", "peak (MB)", "(peak - before) / weights"],
        floatfmt=("", ".0f", ".0f", ".0f", ".2f"), right=(1, 2, 3, 4))
    return ((speed_table(res) + "\n\n" if res["results"] else "") + memory).strip()


def speed_table(res) -> str:
    ours, hf = res["results"]
    rows = [[label, ours[k], hf[k], res["ratio_ours_over_transformers"][k]] for k, label in (
        ("prefill_128_ms", "prefill, 128 tokens (ms)"), ("prefill_512_ms", "prefill, 512 tokens (ms)"),
        ("decode_128_ms_per_token", "decode at context 128 (ms/token)"),
        ("decode_1024_ms_per_token", "decode at context 1024 (ms/token)"))]
    rows += [["matmul floor of one decode step (ms)", res["matmul_floor_ms"],
              f"{res['gemv_floor_ms']:.1f} (one-row GEMV)",
              f"ours at 128 / floor: {res['ours_decode_128_over_matmul_floor']:.2f}"],
             ["matmul floor before tuning the routes (ms)", res["matmul_floor_untuned_ms"], None, None],
             ["streaming read of the same weights (ms)", res["read_floor_ms"], None,
              f"ours at 128 / read: {res['ours_decode_128_over_read_floor']:.2f}"]]
    text = markdown_table(rows, ["measure", "ours", "transformers", "ours / transformers"],
                          floatfmt=("", ".1f", ".1f", ".2f"), right=(1, 2, 3))
    prof = res.get("profile")
    if prof:
        text += (f"\n\nOne decode step at context {prof['context']} under torch.profiler: "
                 f"{prof['profiled_step_ms']:.1f} ms ({prof['step_ms']:.1f} unprofiled), "
                 f"{prof['aten_ops_per_step']:.0f} aten ops\n\n")
        text += markdown_table([[g, ms, f"{ms / prof['profiled_step_ms']:.0%}"] for g, ms in prof["groups_ms"].items()],
                               ["where the time goes", "ms per step", "share"], floatfmt=".1f", right=(1, 2))
    return text


@command
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--runs", type=positive, default=5)
    ap.add_argument("--threads", type=threads, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=RUNS / "bench-decoder.json")
    ap.add_argument("--memory-only", action="store_true", help="only the peak memory of load_model")
    add_load_args(ap)
    a = ap.parse_args(argv)
    if a.memory_only:
        res = {"results": None, "load_memory": [load_memory(a.model, d) for d in ("float32", "bfloat16")]}
        print(table(res))
        return
    writable_file(a.out, "--out", RESULT)  # a new file or a result of ours, and nothing it reads
    check_not_reading(a.out, a.model)
    res = bench(a.model, a.runs, a.threads, a.dtype, a.device)
    write_text_atomic(a.out, record(res))
    print(table(res))


if __name__ == "__main__":
    main()
