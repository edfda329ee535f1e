"""Low-rank adapters (LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv
2106.09685) for fine-tuning with a skip pattern in a few MB instead of a 540 MB checkpoint. Ours:
the Unified Layer Skipping paper fine-tunes every weight (skip/train/finetune.py does that too); a
low-rank fine-tune of the same loss is small enough to commit, so `make demo` can show the
fine-tuned method on a fresh clone.

Notation (the LoRA paper's section 4.1), for one linear map W (out, in) of a decoder layer:
    W' = W + (alpha / rank) * B @ A      A (rank, in) random, B (out, rank) zero at the start,
                                         so training starts from the base model exactly
Only A and B are trained; at inference they are merged into W (a plain model, no extra cost).
Adapted maps: TARGETS of every layer in `layers` (for Unified, its kept set K: the only layers
a generated token runs).

On disk, as the Kangaroo adapter: adapter.safetensors ("blocks.{l}.{target}.A" / ".B", fp32)
and adapter.json (rank, alpha, layers, the base model's shape, the training record; written last).
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.nn.utils import parametrize

from model.config import is_int, is_real
from weights.files import atomic_dir, read_folder

TARGETS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.gate", "mlp.up", "mlp.down")


class LoRAError(ValueError):
    pass


class LowRank(nn.Module):
    """The parametrization W -> W + (alpha / rank) B @ A of one weight (section 4.1)."""

    def __init__(self, out_features, in_features, rank, alpha, like):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, in_features, dtype=like.dtype, device=like.device)
                              / math.sqrt(in_features))  # (rank, in)
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=like.dtype, device=like.device))  # (out, rank)

    def forward(self, W):  # (out, in)
        return W + self.scale * (self.B @ self.A)


def _linears(model, layers):
    """{"blocks.{l}.{target}": Linear} of the given layers (a missing map, e.g. OPT's gate, skipped)."""
    out = {}
    for l in layers:
        for t in TARGETS:
            mod = model.blocks[l]
            for part in t.split("."):
                mod = getattr(mod, part)
            if mod is not None:
                out[f"blocks.{l}.{t}"] = mod
    return out


def attach(model, layers, rank, alpha=None):
    """Put a trainable LowRank on every TARGETS weight of `layers`; returns {name: LowRank}.
    alpha defaults to 2 * rank (scale 2)."""
    if rank < 1:
        raise LoRAError(f"rank must be at least 1, got {rank}")
    alpha = 2 * rank if alpha is None else alpha
    mods = {}
    for name, lin in _linears(model, layers).items():
        out_f, in_f = lin.weight.shape
        mods[name] = LowRank(out_f, in_f, rank, alpha, lin.weight)
        parametrize.register_parametrization(lin, "weight", mods[name])
    return mods


def save_lora(mods, path, model, force=False, **info):
    """adapter.safetensors (A, B of each map, fp32) + adapter.json (written last) in directory path."""
    first = next(iter(mods.values()))
    layers = sorted({int(n.split(".")[1]) for n in mods})
    meta = {"rank": first.A.shape[0], "alpha": first.scale * first.A.shape[0], "layers": layers,
            "targets": list(TARGETS), **shape_of(model.cfg), **info}
    tensors = {f"{n}.{k}": getattr(m, k).detach().float().contiguous().cpu() for n, m in mods.items() for k in "AB"}
    with atomic_dir(path, "adapter.json", force) as tmp:
        save_file(tensors, str(tmp / "adapter.safetensors"))
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=1) + "\n")


def shape_of(cfg):
    return {"n_layers": cfg.n_layers, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size}


def read_lora(path, cfg):
    """(meta, tensors) of an adapter saved by save_lora, checked against a model config: its shape,
    rank an integer >= 1, alpha a finite number, layers distinct integers in [0, n_layers)."""
    meta, tensors = read_folder(path, "adapter.json", "adapter.safetensors", LoRAError, "low-rank adapter")
    if not isinstance(meta, dict):
        raise LoRAError(f"low-rank adapter in {path}: adapter.json must be an object, got {type(meta).__name__}")
    wrong = {k: (meta.get(k), v) for k, v in shape_of(cfg).items() if meta.get(k) != v}
    if wrong:
        raise LoRAError(f"low-rank adapter in {path} was trained for another model: "
                        + ", ".join(f"{k} {a} (model: {b})" for k, (a, b) in wrong.items()))
    rank, alpha, layers = meta.get("rank"), meta.get("alpha"), meta.get("layers")
    if not (is_int(rank) and rank >= 1 and is_real(alpha)):  # a layer True would merge into layer 1
        raise LoRAError(f"low-rank adapter in {path}: need an integer rank >= 1 and a finite alpha, "
                        f"got {rank!r:.20} and {alpha!r:.20}")
    if not (isinstance(layers, list) and layers and all(is_int(l) and 0 <= l < cfg.n_layers for l in layers)
            and len(set(layers)) == len(layers)):
        raise LoRAError(f"low-rank adapter in {path}: layers must be distinct integers in [0, {cfg.n_layers}), "
                        f"got {layers!r:.40}")
    return meta, tensors


@torch.no_grad()
def load_lora(path, model):
    """Merge the adapter in path into model's weights, in place; returns its adapter.json. Every
    file, field and tensor is checked, and every merged weight computed and found finite, before
    the first weight changes: an adapter refused leaves the model as it was."""
    meta, tensors = read_lora(path, model.cfg)
    rank, scale = meta["rank"], meta["alpha"] / meta["rank"]
    lins = _linears(model, meta["layers"])
    want = {f"{n}.{k}" for n in lins for k in "AB"}
    if set(tensors) != want:
        raise LoRAError(f"low-rank adapter in {path} does not fit: missing {sorted(want - set(tensors))[:4]}, "
                        f"unexpected {sorted(set(tensors) - want)[:4]}")

    def merged(n, lin):  # (out, in): in fp32, then cast to the model's dtype
        A, B = tensors[f"{n}.A"].float(), tensors[f"{n}.B"].float()  # (rank, in), (out, rank)
        return lin.weight + (scale * (B @ A)).to(lin.weight.device, lin.weight.dtype)

    for n, lin in lins.items():  # first every check, so that a refusal changes nothing
        A, B = tensors[f"{n}.A"], tensors[f"{n}.B"]
        if A.shape != (rank, lin.in_features) or B.shape != (lin.out_features, rank):
            raise LoRAError(f"{path}: {n} has A {tuple(A.shape)}, B {tuple(B.shape)} for a "
                            f"{lin.out_features}x{lin.in_features} weight at rank {rank}")
        if not (A.is_floating_point() and B.is_floating_point() and torch.isfinite(merged(n, lin)).all()):
            raise LoRAError(f"{path}: {n} is not floating point or merges into a non-finite weight "
                            f"(alpha {meta['alpha']})")
    for n, lin in lins.items():  # then the merge (recomputed: no second copy of the weights held)
        lin.weight.copy_(merged(n, lin))
    return meta
