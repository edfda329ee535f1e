"""python -m skip.kangaroo_official PATH --l L --out DIR [--model DIR]: an adapter of the official
Kangaroo code (read by weights/kangaroo_official.py) written as ours (skip/kangaroo_files.py),
with the settings the official code computes it with (Adapter.own)."""
from __future__ import annotations

import argparse
from pathlib import Path

from model import load_model
from model.cli import command
from weights import DEFAULT_MODEL
from weights.files import check_not_reading
from weights.kangaroo_official import OfficialAdapterError, official_settings, read_official

from .kangaroo_adapter import Adapter
from .kangaroo_files import save_adapter


def convert_official(path, model, l, out, force=False):
    """Write the official adapter at `path`, trained for exit layer l of `model`, to `out`, with the
    settings the official code computes it with."""
    adapter = Adapter(model.cfg, l, official_settings(path, model.cfg))
    want = {k: v for k, v in adapter.state_dict().items() if k != "frequent"}
    ours = read_official(path, sum(v.numel() for v in want.values()))
    shapes = [f"{k} {tuple(ours[k].shape)} (want {tuple(v.shape)})" for k, v in want.items()
              if k in ours and ours[k].shape != v.shape]
    if shapes or set(want) != set(ours):
        raise OfficialAdapterError(f"{path} does not fit this model: {shapes or sorted(set(want) ^ set(ours))}")
    adapter.load_state_dict({**ours, "frequent": adapter.frequent})
    save_adapter(adapter, out, force, source=str(path), trained_by="the official Kangaroo code")
    return adapter


@command
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m skip.kangaroo_official", description=__doc__)
    ap.add_argument("path", type=Path, help="its model.safetensors or pytorch_model.bin, or their folder "
                    "(with the adapter's config.json beside it, as the official code reads it)")
    ap.add_argument("--l", type=int, required=True, help="the exit layer it was trained for")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the model it drafts for")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--force", action="store_true", help="replace an output folder that is not an adapter")
    a = ap.parse_args(argv)
    check_not_reading(a.out, a.path, a.model)  # before the model loads, --force or not
    adapter = convert_official(a.path, load_model(a.model), a.l, a.out, a.force)
    print(f"wrote {a.out}; it computes, as the official code does, with {adapter.own}")


if __name__ == "__main__":
    main()
