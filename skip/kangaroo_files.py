"""Kangaroo adapters on disk: a directory with adapter.safetensors (A's weights and our `frequent`
token ids) and adapter.json (the model's sizes it fits, its exit layer l, "own_config": the
settings it computes with where they are not the model's (Adapter.own; absent: the model's), and
the training record, written last). Loading checks every file, size and tensor, and names what
does not fit."""
from __future__ import annotations

import json

from safetensors.torch import save_file

from weights.files import atomic_dir, read_folder

from .kangaroo import Adapter, AdapterError


def save_adapter(adapter, path, force=False, **info):
    """Write adapter to directory path atomically, with info in adapter.json; a folder that is not
    an adapter is refused unless force."""
    meta = {"l": adapter.l, "dim": adapter.cfg.dim, "n_heads": adapter.cfg.n_heads,
            "n_kv_heads": adapter.cfg.n_kv_heads, "vocab_size": adapter.cfg.vocab_size, **info}
    if adapter.own:  # only then, so that adapter.json of one trained here is as it always was
        meta["own_config"] = adapter.own
    with atomic_dir(path, "adapter.json", force) as tmp:
        save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(tmp / "adapter.safetensors"))
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_adapter(path, model):
    """Load an adapter saved by save_adapter for this model; any mismatch raises AdapterError."""
    meta, tensors = read_folder(path, "adapter.json", "adapter.safetensors", AdapterError, "adapter",
                                " (train one: make kangaroo)")
    cfg = model.cfg
    want = {"dim": cfg.dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size}
    wrong = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if wrong:
        raise AdapterError(f"adapter in {path} was trained for another model: "
                           + ", ".join(f"{k} {a} (model: {b})" for k, (a, b) in wrong.items()))
    own = meta.get("own_config", {})
    if not isinstance(own, dict):
        raise AdapterError(f"adapter in {path}: own_config must be an object, got {own!r}")
    adapter = Adapter(cfg, meta["l"], own)
    adapter.frequent = tensors.get("frequent", adapter.frequent)
    own = adapter.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [f"{k} {tuple(tensors[k].shape)} (want {tuple(own[k].shape)})"
              for k in set(own) & set(tensors) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise AdapterError(f"adapter in {path} does not fit: missing {missing}, unexpected {unexpected}, "
                           f"mis-shaped {shapes}")
    adapter.load_state_dict(tensors)
    return adapter.to(model.device, model.dtype).eval()  # dtype casts the weights, not the ids in `frequent`
