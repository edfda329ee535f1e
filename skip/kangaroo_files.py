"""Kangaroo adapters on disk: a directory with adapter.safetensors (A's weights and our `frequent`
token ids) and adapter.json (the model's sizes it fits, its exit layer l, "own_config": the
settings it computes with where they are not the model's (Adapter.own; absent: the model's), and
the training record, written last). Loading checks every file, size and tensor, and names what
does not fit: the model's sizes and l integers (a boolean is not one), l in [1, n_layers), every
weight of its shape, floating and finite, `frequent` distinct integer token ids below the
vocabulary, the own settings those an adapter may have (kangaroo_adapter.own_settings)."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from model.config import is_int
from weights.files import atomic_dir, read_folder

from .kangaroo_adapter import Adapter, AdapterError


def save_adapter(adapter, path, force=False, **info):
    """Write adapter to directory path atomically, with info in adapter.json; a folder that is not
    an adapter is refused unless force."""
    meta = {"l": adapter.l, "dim": adapter.cfg.dim, "n_heads": adapter.cfg.n_heads,
            "n_kv_heads": adapter.cfg.n_kv_heads, "vocab_size": adapter.cfg.vocab_size, **info}
    if adapter.own:  # only then, so that adapter.json of one trained here is as it always was
        meta["own_config"] = adapter.own
    try:
        text = json.dumps(meta, indent=1, allow_nan=False)
    except ValueError as e:
        raise AdapterError(f"adapter for {path}: its record holds a non-finite number, which JSON cannot hold") from e
    with atomic_dir(path, "adapter.json", force) as tmp:
        save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(tmp / "adapter.safetensors"))
        (tmp / "adapter.json").write_text(text + "\n")


def load_adapter(path, model):
    """Load an adapter saved by save_adapter for this model; any mismatch raises AdapterError."""
    meta, tensors = read_folder(path, "adapter.json", "adapter.safetensors", AdapterError, "adapter",
                                " (train one: make kangaroo)")
    cfg = model.cfg
    if not isinstance(meta, dict):
        raise AdapterError(f"adapter in {path}: adapter.json must be an object, got {type(meta).__name__}")
    want = {"dim": cfg.dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size}
    wrong = {k: (meta.get(k), v) for k, v in want.items() if not is_int(meta.get(k)) or meta.get(k) != v}
    if wrong:
        raise AdapterError(f"adapter in {path} was trained for another model: "
                           + ", ".join(f"{k} {a} (model: {b})" for k, (a, b) in wrong.items()))
    l = meta.get("l")
    if not (is_int(l) and 0 < l < cfg.n_layers):  # True would run as l = 1
        raise AdapterError(f"adapter in {path}: l must be an integer in [1, {cfg.n_layers - 1}], got {l!r}")
    own = meta.get("own_config", {})
    if not isinstance(own, dict):
        raise AdapterError(f"adapter in {path}: own_config must be an object, got {own!r}")
    adapter = Adapter(cfg, l, own)
    frequent = tensors.get("frequent", adapter.frequent)
    if frequent.is_floating_point() or frequent.is_complex() or frequent.dtype == torch.bool or frequent.ndim != 1:
        raise AdapterError(f"adapter in {path}: frequent must be a list of integer token ids, got "
                           f"{frequent.dtype} of shape {tuple(frequent.shape)}")
    if len(frequent) and not (0 <= int(frequent.min()) and int(frequent.max()) < cfg.vocab_size):
        raise AdapterError(f"adapter in {path}: frequent holds a token id outside [0, {cfg.vocab_size})")  # -1 wraps
    if len(frequent.unique()) != len(frequent):
        raise AdapterError(f"adapter in {path}: frequent lists a token id twice")
    adapter.frequent = frequent.long()
    own = adapter.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [f"{k} {tuple(tensors[k].shape)} (want {tuple(own[k].shape)})"
              for k in set(own) & set(tensors) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise AdapterError(f"adapter in {path} does not fit: missing {missing}, unexpected {unexpected}, "
                           f"mis-shaped {shapes}")
    bad = sorted(k for k in own if k != "frequent" and not (tensors[k].is_floating_point()
                                                             and bool(torch.isfinite(tensors[k]).all())))
    if bad:
        raise AdapterError(f"adapter in {path}: weights {bad} are not floating point and finite (NaN or inf)")
    adapter.load_state_dict(tensors)
    return adapter.to(model.device, model.dtype).eval()  # dtype casts the weights, not the ids in `frequent`
