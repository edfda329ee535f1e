"""Strict loading of a HF-style directory: config.json + model.safetensors (or sharded).

Every tensor of our model must be in the checkpoint with the right shape, and every
tensor of the checkpoint must be used; otherwise one LoadError lists all the problems.
Pickle checkpoints (.bin, .pt) are refused: loading them can run arbitrary code.
Sizes are bounded before anything is allocated: the parameter count config.json implies
(model.config.n_params) may not exceed twice what the safetensors headers hold, and every shape
is checked on the meta device first.
Memory stays bounded: the model is built on the meta device, given storage in the target
dtype and device, and each tensor is read from the file straight into it (a tensor stored in
another precision passes through one reused CHUNK-byte buffer), so loading needs the loaded
weights plus that buffer, not an fp32 copy of the model and not a memory map.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import load_config, n_params
from .jsonfile import read_json
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


# safetensors dtype names that may be cast to the model's
FLOATING = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


CHUNK = 1 << 24  # bytes read (and checked) at a time when a tensor cannot be read in place


def header(file: Path):
    """(offset of the data, {name: {dtype, shape, data_offsets}}) of a safetensors file whose
    header safe_open has already validated."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def read_into(file: Path, name: str, base: int, info: dict, out: torch.Tensor, scratch: torch.Tensor):
    """Copy tensor `name` (its header entry `info`, data from byte `base`) into out, any dtype and
    device, with plain reads: straight into out's memory when the dtypes match on the CPU, else
    CHUNK bytes at a time through scratch (CHUNK uint8, reused: freeing and re-allocating
    buffers would leave them in the process's heap)."""
    start, end = info["data_offsets"]
    src, flat = FLOATING[info["dtype"]], out.view(-1)
    direct = out.device.type == "cpu" and out.dtype == src and out.is_contiguous()
    step = flat.numel() if direct else CHUNK // src.itemsize
    with open(file, "rb") as f:
        f.seek(base + start)
        for i in range(0, flat.numel(), step):
            k = min(step, flat.numel() - i)
            buf = flat[i:i + k] if direct else scratch[:k * src.itemsize].view(src)
            if f.readinto(buf.view(torch.uint8).numpy()) != k * src.itemsize:
                raise LoadError(f"{file}: tensor {name} is cut short")
            if not direct:
                flat[i:i + k].copy_(buf)


def all_finite(t: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(c).all()) for c in t.view(-1).split(CHUNK // 4))


def summary(items, n=5):
    """The first n items, then how many more: an error stays readable for a 7B checkpoint."""
    return ", ".join(items[:n]) + (f", ... and {len(items) - n} more" if len(items) > n else "")


def _shards(path: Path) -> dict[str, Path]:
    """HF tensor name -> file holding it (inside path: an index may not point elsewhere)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = {k: path / f for k, f in read_json(index, "safetensors index")["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
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


def check_device(device) -> torch.device:
    """The device as torch names it, or a LoadError saying why this machine cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LoadError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, mps): {e}") from None
    if dev.type == "cuda":
        usable = torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    else:
        usable = dev.type == "cpu" or (dev.type == "mps" and torch.backends.mps.is_available())
    if not usable:
        raise LoadError(f"device {device!r} is not available on this machine (cpu always is)")
    return dev


def add_load_args(ap):
    """--device and --dtype, the same for every command that loads a model."""
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))


def load_model(path, dtype="float32", allow_nonfinite=False, device="cpu") -> Decoder:
    """Strict: every tensor present, expected, of its shape, floating and finite (allow_nonfinite
    for debugging a broken checkpoint); stored precisions other than dtype are cast, and said once."""
    path = Path(path)
    if dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    device = check_device(device)
    cfg = load_config(path)
    where = _shards(path)
    stored = {k: k for k in where}  # our HF name -> the name in the file
    if cfg.arch == "opt" and not any(k.startswith("model.") for k in where):
        stored = {"model." + k: k for k in where}  # OPT checkpoints saved from the base model
        where = {"model." + k: f for k, f in where.items()}

    shapes, dtypes, handles = {}, {}, {}  # from the files' headers: no tensor data is read
    for name, file in where.items():
        if file not in handles:
            handles[file] = safe_open(file, "pt")
        sl = handles[file].get_slice(stored[name])
        shapes[name], dtypes[name] = tuple(sl.get_shape()), sl.get_dtype()
    # A config's sizes are bounded by its weights, in milliseconds, before anything is built. Up to
    # twice the weights, the shape check below lists what differs, after a meta build that the
    # config's limits keep short, and still before anything is allocated.
    held = sum(math.prod(s) for s in shapes.values())
    if n_params(cfg) > 2 * held:
        raise LoadError(f"cannot load {path}: its config.json describes {n_params(cfg):,} parameters, "
                        f"more than twice the {held:,} its weights hold")

    def tensors(model):  # HF name -> our tensor
        ours = {hf_name(cfg.arch, k): t for k, t in model.state_dict().items()}
        if cfg.tie_embeddings:
            ours.pop("lm_head.weight")  # shared with the embedding
        return ours

    with torch.device("meta"):  # shapes only: nothing is allocated until every shape is checked
        model = Decoder(cfg)
    ours = tensors(model)

    missing = sorted(set(ours) - set(where))
    unexpected = sorted(k for k in set(where) - set(ours) if not k.endswith(IGNORED_SUFFIXES))
    if cfg.tie_embeddings and "lm_head.weight" in unexpected:
        head = handles[where["lm_head.weight"]].get_tensor(stored["lm_head.weight"])
        embed_name = hf_name(cfg.arch, "embed.weight")
        if embed_name in where and torch.equal(head, handles[where[embed_name]].get_tensor(stored[embed_name])):
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

    for module in model.modules():  # uninitialised, in dtype on device (module.to_empty would take
        for name, p in module.named_parameters(recurse=False):  # seconds: on meta it imports sympy)
            setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=DTYPES[dtype], device=device)))
    if cfg.tie_embeddings:  # each module got its own tensor
        model.head.weight = model.embed.weight
    ours = tensors(model)
    cast = sorted({dtypes[k] for k in ours} - {"F32"})
    if cast and dtype == "float32":  # the default: say that the stored precision is not what runs
        print(f"note: {path} stores {', '.join(cast)} tensors; loading them as float32", file=sys.stderr)

    nonfinite, scratch = [], torch.empty(CHUNK, dtype=torch.uint8)
    headers = {file: header(file) for file in handles}  # each file's header parsed once
    with torch.no_grad():
        for name, t in ours.items():
            base, entries = headers[where[name]]
            read_into(where[name], stored[name], base, entries[stored[name]], t, scratch)
            if not all_finite(t):
                nonfinite.append(name)
    if nonfinite and not allow_nonfinite:
        raise LoadError(f"cannot load {path}: non-finite values (NaN or inf) in {len(nonfinite)} tensor(s): "
                        f"{summary(nonfinite)} (allow_nonfinite=True loads them anyway, for debugging)")
    return model.eval()


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
