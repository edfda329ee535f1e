"""An adapter checkpoint of the official Kangaroo code (Equationliu/Kangaroo, `kangaroo/adapter.py`:
AdapterModel's state dict, as accelerate saves it: model.safetensors or pytorch_model.bin) in
this project's adapter format (skip/kangaroo.py: adapter.safetensors + adapter.json).

    official key                                  ours
    layers.0.input_layernorm.weight               norm_in.weight
    layers.0.self_attn.{q,k,v,o}_proj.weight      attn.w{q,k,v,o}.weight
    norm.weight                                   norm_out.weight

A pickle file is read with torch.load(weights_only=True), which builds tensors and executes no
code; any other key, a missing one or a wrong shape is an error that names it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

KEYS = {"layers.0.input_layernorm.weight": "norm_in.weight", "norm.weight": "norm_out.weight",
        **{f"layers.0.self_attn.{p}_proj.weight": f"attn.w{p}.weight" for p in "qkvo"}}
IGNORED = ("layers.0.self_attn.rotary_emb.",)  # buffers of older transformers versions, recomputed here


class OfficialAdapterError(ValueError):
    pass


def read_official(path):
    """The official state dict, renamed to ours (a dict of tensors)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise OfficialAdapterError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or a pickle that is more than tensors
        raise OfficialAdapterError(f"cannot read {path}: {e}") from e
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(IGNORED)}
    missing, unexpected = sorted(set(KEYS) - set(state)), sorted(set(state) - set(KEYS))
    if missing or unexpected:
        raise OfficialAdapterError(f"{path} is not an official Kangaroo adapter: missing {missing}, "
                                   f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    bad = [k for k, v in state.items() if not (torch.is_tensor(v) and v.is_floating_point())]
    if bad:
        raise OfficialAdapterError(f"{path}: not floating-point tensors: {bad}")
    return {KEYS[k]: v.float() for k, v in state.items()}


def convert_official(path, model, l, out, force=False):
    """Write the official adapter at `path`, trained for exit layer l of `model`, to `out`."""
    from skip.kangaroo import Adapter, save_adapter

    adapter = Adapter(model.cfg, l)
    ours = read_official(path)
    own = {k: v for k, v in adapter.state_dict().items() if k != "frequent"}
    shapes = [f"{k} {tuple(ours[k].shape)} (want {tuple(v.shape)})" for k, v in own.items() if ours[k].shape != v.shape]
    if shapes or set(own) != set(ours):
        raise OfficialAdapterError(f"{path} does not fit this model: {shapes or sorted(set(own) ^ set(ours))}")
    adapter.load_state_dict({**ours, "frequent": adapter.frequent})
    save_adapter(adapter, out, force, source=str(path), trained_by="the official Kangaroo code")
    return adapter
