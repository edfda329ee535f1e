"""Strict loading of a HF-style directory: config.json + model.safetensors (or sharded).

Every tensor of our model must be in the checkpoint with the right shape, and every
tensor of the checkpoint must be used; otherwise one LoadError lists all the problems.
Pickle checkpoints (.bin, .pt) are refused: loading them can run arbitrary code.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import load_config
from .decoder import Decoder


class LoadError(ValueError):
    pass


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# our module name -> HF name, one dotted component at a time ("" drops the component)
HF_NAMES = {
    "llama": {"embed": "model.embed_tokens", "blocks": "model.layers", "norm": "model.norm", "head": "lm_head",
              "norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn": "self_attn",
              "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "opt": {"embed": "model.decoder.embed_tokens", "pos_embed": "model.decoder.embed_positions",
            "proj_in": "model.decoder.project_in", "proj_out": "model.decoder.project_out",
            "blocks": "model.decoder.layers", "norm": "model.decoder.final_layer_norm", "head": "lm_head",
            "norm1": "self_attn_layer_norm", "norm2": "final_layer_norm", "attn": "self_attn",
            "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "out_proj", "mlp": "", "up": "fc1", "down": "fc2"},
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a recomputed buffer that old Llama checkpoints carry


def hf_name(arch, name):
    parts = (HF_NAMES[arch].get(p, p) for p in name.split("."))
    return ".".join(p for p in parts if p)


FLOATING = {"F64", "F32", "F16", "BF16"}  # safetensors dtype names that may be cast to the model's


def summary(items, n=5):
    """The first n items, then how many more: an error stays readable for a 7B checkpoint."""
    return ", ".join(items[:n]) + (f", ... and {len(items) - n} more" if len(items) > n else "")


def _shards(path: Path) -> dict[str, Path]:
    """HF tensor name -> file holding it (inside path: an index may not point elsewhere)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise LoadError(f"{index} is not a safetensors index ({e!r})") from None
        outside = sorted({str(f) for f in files.values() if not f.resolve().is_relative_to(path.resolve())})
        if outside:
            raise LoadError(f"{index} points outside {path}: {summary(outside)}")
        absent = sorted({f.name for f in files.values() if not f.is_file()})
        if absent:
            raise LoadError(f"{index} names shard files that do not exist: {summary(absent)}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise LoadError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); this project never unpickles. "
            "Convert them to safetensors first, e.g. in a trusted environment: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
    raise LoadError(f"{path} has no model.safetensors or model.safetensors.index.json")


def load_model(path, dtype="float32", allow_nonfinite=False) -> Decoder:
    """Strict: every tensor present, expected, of its shape, floating and finite (allow_nonfinite
    for debugging a broken checkpoint); a precision other than fp32 is cast, and said once."""
    path = Path(path)
    if dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    cfg = load_config(path)
    where = _shards(path)
    if cfg.arch == "opt" and not any(k.startswith("model.") for k in where):
        where = {"model." + k: f for k, f in where.items()}  # OPT checkpoints saved from the base model

    model = Decoder(cfg)
    ours = {hf_name(cfg.arch, k): t for k, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight")  # shared with the embedding
    shapes, dtypes, handles = {}, {}, {}
    for name, file in where.items():
        if file not in handles:
            handles[file] = safe_open(file, "pt")
        sl = handles[file].get_slice(name)
        shapes[name], dtypes[name] = tuple(sl.get_shape()), sl.get_dtype()

    missing = sorted(set(ours) - set(where))
    unexpected = sorted(k for k in set(where) - set(ours) if not k.endswith(IGNORED_SUFFIXES))
    if cfg.tie_embeddings and "lm_head.weight" in unexpected:
        head = handles[where["lm_head.weight"]].get_tensor("lm_head.weight")
        embed_name = hf_name(cfg.arch, "embed.weight")
        if embed_name in where and torch.equal(head, handles[where[embed_name]].get_tensor(embed_name)):
            unexpected.remove("lm_head.weight")  # a tied head saved twice, harmless
    misshaped = sorted(f"{k}: checkpoint {shapes[k]}, model {tuple(ours[k].shape)}"
                       for k in set(ours) & set(where) if shapes[k] != tuple(ours[k].shape))
    not_float = sorted(f"{k} ({dtypes[k]})" for k in set(ours) & set(where) if dtypes[k] not in FLOATING)
    if missing or unexpected or misshaped or not_float:
        lines = [f"cannot load {path}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped),
                             ("not floating point", not_float)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + summary(items))
        raise LoadError("\n".join(lines))
    cast = sorted({dtypes[k] for k in ours} - {"F32"})
    if cast:
        print(f"note: {path} stores {', '.join(cast)} tensors; loading them as float32", file=sys.stderr)

    nonfinite = []
    with torch.no_grad():
        for name, t in ours.items():
            t.copy_(handles[where[name]].get_tensor(name))
            if not bool(torch.isfinite(t).all()):
                nonfinite.append(name)
    if nonfinite and not allow_nonfinite:
        raise LoadError(f"cannot load {path}: non-finite values (NaN or inf) in {len(nonfinite)} tensor(s): "
                        f"{summary(nonfinite)} (allow_nonfinite=True loads them anyway, for debugging)")
    return model.to(DTYPES[dtype]).eval()


def save_model(model: Decoder, out_dir, config_from):
    """Write model as a HF-style directory (config.json copied from config_from, tensors under
    their HF names) that load_model reads back."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(config_from) / "config.json", out_dir / "config.json")
    tensors = {hf_name(model.cfg.arch, k): t.detach().contiguous().cpu() for k, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        tensors.pop("lm_head.weight")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
