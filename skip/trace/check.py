"""The trace format checked (skip/trace/format.py): every field of trace.json and every tensor of
trace.safetensors, when a trace is read, so that `compare` and `show` never read a file that is
not a trace as one. What fails raises TraceError naming it (the command's status 2):
  fields   FIELDS, each of its type; another field is refused (a new field is a new VERSION)
  JSON     every number finite (NaN and Infinity are not JSON); token ids integers below the vocabulary
  tensors  exactly trace.py's four, each non-empty, of its shape for the model, floating, but
           lens_ids distinct integer ids below the vocabulary; probabilities in [0, 1], norms
           >= 0 (a non-finite value is not refused: compare reports where it appears); another
           tensor is refused
  steps    a list of objects, none empty, the same keys in every step; a key of the method's
           STEP_FIELDS holds values of its type (ids integers, never floats, decisions booleans);
           a key the method does not have here (a port's own) is left to compare, which names it
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from model.config import is_int
from weights.files import read_folder

from .format import DEFAULTS, DTYPES, FILES, MODEL_FIELDS, VERSION, TraceError

# value kinds: NAT an integer >= 0, ID a token id, LAYER a layer index, REAL a number, BOOL a
# decision; [kind] a list of them, (kind, ...) a list of exactly those
NAT, ID, LAYER, REAL, BOOL = "an integer >= 0", "a token id", "a layer index", "a number", "a boolean"
STEP_FIELDS = {
    "full": {},
    "unified": {"kept_layers": [LAYER]},
    "skipdecode": {"schedule": [NAT]},
    "adainfer": {"exit_layer": LAYER, "checks": [(LAYER, [REAL], ID)], "scores": [REAL], "stops": [BOOL]},
    "kangaroo": {"drafted": NAT, "accepted": NAT, "drafts": [ID], "cache_lengths": [NAT], "adapter_cache_length": NAT,
                 "draft_top_ids": [[ID]], "draft_top_probs": [[REAL]], "exited_norms": [REAL],
                 "verify_top_ids": [[ID]], "verify_top_probs": [[REAL]]},
}
OPTIONAL = ("dtype", "flops", "layer_runs")  # a port's trace may lack them (no dtype: float32)
FIELDS = ("version", "model", "method", "settings", "prompt", "tokens", "steps") + OPTIONAL
TENSOR_NAMES = ("hidden", "hidden_norms", "lens_ids", "lens_probs")


def read(path, with_tensors=True):
    """(trace.json, the tensors) of a trace folder, every field and tensor checked (below);
    with_tensors=False: trace.json only (check_tensors after)."""
    batch = (Path(path) / "batch.json").is_file()  # skip/trace/batch.py
    hint = f" (a batch of traces: its rows are {Path(path) / 'row-*'})" if batch else ""
    meta, t = read_folder(path, *FILES, TraceError, "trace", hint)
    check(meta, t, path, with_tensors)
    return meta, t


def fits(v, kind, model):
    """Whether JSON value v is of kind (above) for a model {n_layers, vocab_size, ...}."""
    if isinstance(kind, list):
        return isinstance(v, list) and all(fits(x, kind[0], model) for x in v)
    if isinstance(kind, tuple):
        return isinstance(v, list) and len(v) == len(kind) and all(fits(x, k, model) for x, k in zip(v, kind))
    if kind == BOOL:
        return isinstance(v, bool)
    if kind == REAL:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    top = {NAT: math.inf, ID: model["vocab_size"], LAYER: model["n_layers"]}[kind]
    return is_int(v) and 0 <= v < top


def first_nonfinite(v, at=""):
    """The path of the first non-finite number in a JSON value, or None."""
    if isinstance(v, float) and not math.isfinite(v):
        return at or "the top level"
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        found = first_nonfinite(x, f"{at}.{k}" if isinstance(k, str) else f"{at}[{k}]")
        if found:
            return found
    return None


def check(meta, tensors, path, with_tensors=True):
    """Raise TraceError, naming the folder and the first thing wrong, unless (trace.json,
    trace.safetensors) as read are a trace of this VERSION; with_tensors=False: trace.json only
    (check_tensors after)."""
    def bad(why):
        raise TraceError(f"{path} is not a valid trace: {why}")
    if not isinstance(meta, dict):
        bad(f"trace.json holds {type(meta).__name__}, not an object")
    if meta.get("version") != VERSION:
        raise TraceError(f"trace in {path} has version {meta.get('version')}; this reader understands {VERSION}")
    unknown, missing = set(meta) - set(FIELDS), set(FIELDS) - set(OPTIONAL) - set(meta)
    if unknown or missing:
        bad(f"trace.json has unknown fields {sorted(unknown)}, lacks {sorted(missing)}")
    if (where := first_nonfinite(meta)) is not None:
        bad(f"trace.json holds a non-finite number at {where} (NaN and Infinity are not JSON)")
    model = meta["model"]
    if not (isinstance(model, dict) and set(model) == set(MODEL_FIELDS) and all(is_int(v) and v > 0 for v in model.values())):
        bad(f"model must be an object of positive integers {list(MODEL_FIELDS)}, got {model!r:.120}")
    if meta["method"] not in DEFAULTS:
        bad(f"method {meta['method']!r:.40} is none of {', '.join(DEFAULTS)}")
    if not isinstance(meta["settings"], dict):
        bad(f"settings must be an object, got {type(meta['settings']).__name__}")
    if meta.get("dtype", "float32") not in DTYPES:
        bad(f"dtype {meta.get('dtype')!r:.40} is none of {', '.join(DTYPES)}")
    if meta.get("flops") is not None and not (fits(meta["flops"], REAL, model) and meta["flops"] >= 0):
        bad(f"flops must be null or a number >= 0, got {meta['flops']!r:.40}")
    for name in ("prompt", "tokens"):
        if not fits(meta[name], [ID], model):
            bad(f"{name} must be a list of integer token ids in [0, {model['vocab_size']})")
    if not meta["prompt"]:
        bad("the prompt is empty")
    if "layer_runs" in meta and not fits(meta["layer_runs"], [(NAT, LAYER, [REAL])], model):
        bad("layer_runs must be a list of [slot, layer, [norm per slot]]")
    if "layer_runs" in meta and not all(run[2] for run in meta["layer_runs"]):
        bad("a layer run covers no slot")
    check_steps(meta, model, bad)
    if with_tensors:
        check_tensors(meta, tensors, path)


def check_steps(meta, model, bad):
    steps, fields = meta["steps"], STEP_FIELDS[meta["method"]]
    if not isinstance(steps, list) or not all(isinstance(st, dict) and st for st in steps):
        bad("steps must be a list of non-empty objects")
    for s, st in enumerate(steps):
        if st.keys() != steps[0].keys():
            bad(f"step {s} records {sorted(st)}, step 0 {sorted(steps[0])}: every step records the same keys")
        for k, v in st.items():
            if k in fields and not fits(v, fields[k], model):
                bad(f"step {s}: {k} must be {describe(fields[k])}, got {v!r:.80}")


def describe(kind):
    if isinstance(kind, list):
        return f"a list of ({describe(kind[0])})"
    if isinstance(kind, tuple):
        return "[" + ", ".join(describe(k) for k in kind) + "]"
    return kind


def check_tensors(meta, t, path):
    """check's part on trace.safetensors, against the checked trace.json meta."""
    def bad(why):
        raise TraceError(f"{path} is not a valid trace: {why}")
    model, T = meta["model"], len(meta["prompt"])
    unknown, missing = set(t) - set(TENSOR_NAMES), set(TENSOR_NAMES) - set(t)
    if unknown or missing:
        bad(f"trace.safetensors has unknown tensors {sorted(unknown)}, lacks {sorted(missing)}")
    L1, d = model["n_layers"] + 1, model["dim"]
    shapes = {"hidden": (t["hidden"].ndim == 3 and t["hidden"].shape[0] == L1 and 1 <= t["hidden"].shape[1] <= T
                         and t["hidden"].shape[2] == d, f"(n_layers + 1, P in [1, {T}], dim) = ({L1}, P, {d})"),
              "hidden_norms": (tuple(t["hidden_norms"].shape) == (L1, T), f"(n_layers + 1, prompt length) = ({L1}, {T})"),
              "lens_probs": (t["lens_probs"].ndim == 2 and t["lens_probs"].shape[0] == L1 and t["lens_probs"].shape[1] >= 1,
                             f"(n_layers + 1, k >= 1) = ({L1}, k)"),
              "lens_ids": (t["lens_ids"].shape == t["lens_probs"].shape, "that of lens_probs")}
    for name, (ok, want) in shapes.items():
        if not ok:
            bad(f"tensor {name} has shape {tuple(t[name].shape)}, not {want}")
    for name in ("hidden", "hidden_norms", "lens_probs"):
        if not t[name].is_floating_point():
            bad(f"tensor {name} is {t[name].dtype}, not floating point")
    ids = t["lens_ids"]
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        bad(f"tensor lens_ids is {ids.dtype}: token ids are integers")
    if not bool(((ids >= 0) & (ids < model["vocab_size"])).all()):
        bad(f"tensor lens_ids holds an id outside [0, {model['vocab_size']})")
    if ids.shape[1] > 1 and bool((ids.sort(-1).values.diff(dim=-1) == 0).any()):
        bad("tensor lens_ids lists an id twice in a row: a top-k lists k distinct ids")
    probs, norms = t["lens_probs"], t["hidden_norms"]  # a non-finite value is compare's finding, not an error
    if bool(((probs < 0) | ((probs > 1) & torch.isfinite(probs))).any()) or bool((norms < 0).any()):
        bad("tensor lens_probs holds a value outside [0, 1] or hidden_norms a negative norm")
