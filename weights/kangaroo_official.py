"""An adapter checkpoint of the official Kangaroo code (Equationliu/Kangaroo, `kangaroo/adapter.py`:
AdapterModel's state dict, as accelerate saves it: model.safetensors or pytorch_model.bin) read
and renamed to this project's keys, with the settings the official code computes it with;
skip/kangaroo_official.py builds our adapter from them and writes it (skip/kangaroo_files.py).

    official key                                  ours
    layers.0.input_layernorm.weight               norm_in.weight
    layers.0.self_attn.{q,k,v,o}_proj.weight      attn.w{q,k,v,o}.weight
    norm.weight                                   norm_out.weight

The official AdapterModel is built from a config.json of its own (beside the checkpoint, read by
kangaroo_model.py), not from the model's, and computes with settings that need not be the model's;
the adapter keeps them as its own (Adapter.own), so it drafts here as it does there:
  - RoPE: its LlamaRotaryEmbedding(head_dim, max_position_embeddings) keeps the default base
    10000 and reads neither rope_theta nor rope_scaling (OFFICIAL_ROPE).
  - RMSNorm eps: that config's rms_norm_eps (LlamaConfig's default 1e-6 when absent); the
    model's when no config.json is beside the checkpoint.
  - head layout: that config's heads, head_dim = hidden_size // num_attention_heads; one that
    differs from the model's is refused (the weights' shapes alone cannot tell). No bias, ever: a
    model with attention bias has no official adapter (its bias keys would be missing).

A pickle file is read with torch.load(weights_only=True), which builds tensors and executes no
code; any other key, a missing one or a wrong shape is an error that names it. Before anything
is read, the file's size, and for a .bin (torch.save's zip archive) the size its members inflate
to (from the zip's directory), must fit an adapter of this model: its parameter count x 4 bytes
(fp32) x SLACK + OVERHEAD; a small file that inflates to gigabytes is refused unread.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.jsonfile import read_json

KEYS = {"layers.0.input_layernorm.weight": "norm_in.weight", "norm.weight": "norm_out.weight",
        **{f"layers.0.self_attn.{p}_proj.weight": f"attn.w{p}.weight" for p in "qkvo"}}
IGNORED = ("layers.0.self_attn.rotary_emb.",)  # buffers of older transformers versions, recomputed here
OFFICIAL_ROPE = {"rope_theta": 10000.0, "rope_type": "default"}
SLACK, OVERHEAD = 2, 1 << 20  # fp64 fits; the pickle, zip records and rotary buffers fit in OVERHEAD


class OfficialAdapterError(ValueError):
    pass


def checkpoint_file(path):
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise OfficialAdapterError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    return path


def check_size(path: Path, numel: int):
    """Refuse a file larger, or a zip whose members inflate larger, than an adapter of numel
    parameters can be, reading only the file's size and the zip's directory."""
    limit = numel * 4 * SLACK + OVERHEAD
    size = path.stat().st_size
    if size > limit:
        raise OfficialAdapterError(f"{path} is {size:,} bytes; an adapter of this model ({numel:,} parameters) "
                                   f"is at most {limit:,}")
    if path.suffix == ".safetensors":
        return
    if not zipfile.is_zipfile(path):
        raise OfficialAdapterError(f"{path} is not a zip archive, the format torch.save has written since torch 1.6")
    try:
        with zipfile.ZipFile(path) as z:
            inflated = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise OfficialAdapterError(f"cannot read {path}: {e}") from None
    if inflated > limit:
        raise OfficialAdapterError(f"{path} inflates to {inflated:,} bytes; an adapter of this model "
                                   f"({numel:,} parameters) is at most {limit:,}")


def read_official(path, numel):
    """The official state dict, renamed to ours (a dict of tensors), of an adapter with numel
    parameters (check_size)."""
    path = checkpoint_file(path)
    check_size(path, numel)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or a pickle that is more than tensors
        raise OfficialAdapterError(f"cannot read {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise OfficialAdapterError(f"{path} is not an official Kangaroo adapter: not a state dict of named tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(IGNORED)}
    missing, unexpected = sorted(set(KEYS) - set(state)), sorted(set(state) - set(KEYS))
    if missing or unexpected:
        raise OfficialAdapterError(f"{path} is not an official Kangaroo adapter: missing {missing}, "
                                   f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    bad = [k for k, v in state.items() if not (torch.is_tensor(v) and v.is_floating_point())]
    if bad:
        raise OfficialAdapterError(f"{path}: not floating-point tensors: {bad}")
    return {KEYS[k]: v.float() for k, v in state.items()}


def official_settings(path, cfg):
    """The settings the official code computes this adapter with (Adapter.own), from the config.json
    beside its checkpoint, which must describe the model's head layout."""
    file = checkpoint_file(path).parent / "config.json"
    if not file.is_file():
        return dict(OFFICIAL_ROPE)
    try:
        c = read_json(file, "adapter config", 1 << 20)
        heads = c["num_attention_heads"]
        layout = {"hidden_size": (c["hidden_size"], cfg.dim), "num_attention_heads": (heads, cfg.n_heads),
                  "num_key_value_heads": (c.get("num_key_value_heads") or heads, cfg.n_kv_heads),
                  "hidden_size // num_attention_heads": (c["hidden_size"] // heads, cfg.head_dim)}
        eps = c.get("rms_norm_eps", 1e-6)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise OfficialAdapterError(f"{file} is not an adapter's config: {e!r}") from None
    wrong = [f"{k} {a} (model: {b})" for k, (a, b) in layout.items() if a != b]
    if wrong:
        raise OfficialAdapterError(f"{file} describes another head layout: {', '.join(wrong)}")
    return {**OFFICIAL_ROPE, "norm_eps": eps}
