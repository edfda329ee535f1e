"""Traces, the oracle format: everything another implementation needs to check itself against
ours, for one model, one prompt and one method; and `compare`, which finds the first divergence.

A trace is a directory with trace.json (version, model, method, settings, token ids, per-step
records, FLOPs) and trace.safetensors (tensors). Conventions, so that any implementation
(C++, CUDA, transformers) can write one:
  hidden         (L+1, P, d) float32  the prompt pass at the stored positions P (default: the last
                 4): index 0 = embeddings, i = output of layer i-1, L = after the final norm
                 (transformers' output_hidden_states convention)
  hidden_norms   (L+1, T) float32     L2 norm of each of those states at every prompt position
  lens_ids, lens_probs  (L+1, k)      logit lens at the last prompt position: top-k of
                 softmax(head(norm(hidden[i]))) (hidden[L] is already normed; hidden[0] too is
                 passed through the norm)
JSON "settings": every setting the method ran with, defaults included. JSON "steps": what the
method decided, with the state it decided on (top-k lists: ids and probabilities, rank 0 first,
K = TOP_K). Kangaroo: steps[s] is round s: drafted, accepted, drafts, cache lengths after the crop;
draft_top_ids/_probs (per draft, the draft head's top-k), exited_norms (||h_l|| of x, d_1..d_k,
the states verification starts from) and verify_top_ids/_probs (per verified position, M's top-k).
AdaInfer: steps[s] is the pass that fed back generated token s, producing token s + 1 (token 0
comes from the prompt pass): exit_layer and checks, [layer, [FEATURES], top-1 id] per layer checked;
with a stop classifier in place of tau (settings "classifier": its file's kind, features, params)
also, per check, scores (threshold: the feature; svm: w . (x - mean) / std + b; crf: the online
Viterbi margin delta[1] - delta[0] after that layer) and stops (score >= tau; score > 0).
Unified: one step, the kept layers. SkipDecode: one step, n_t per decode step.
"layer_runs": every layer the method ran, in order, [first slot, layer, ||h|| per slot].
"flops": the decoder's record in total (model/flops.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import positions
from model.config import is_int, is_real
from weights import WEIGHTS
from weights.files import atomic_dir

from ..kangaroo_batch import POLICIES

VERSION = 1
MODEL_FIELDS = ("n_layers", "dim", "n_heads", "n_kv_heads", "vocab_size")
FILES = ("trace.json", "trace.safetensors")
DTYPES = ("float32", "float16", "bfloat16")  # by increasing rounding error
TOP_K = 5


class TraceError(ValueError):
    pass


def model_info(cfg):
    return {k: getattr(cfg, k) for k in MODEL_FIELDS}


@torch.inference_mode()
def prompt_pass(model, ids, n_pos=4, k=TOP_K):
    """The tensors of a trace from our decoder's per-layer API."""
    x = torch.tensor([ids], device=model.device)
    pos = positions(None, 0, x.shape[1], x.device)
    states = [model.embed_tokens(x, pos)]
    model.run_layers(states[0], pos, callback=lambda i, h, a, m: states.append(h))
    states[-1] = model.final(states[-1])  # the convention: the last entry is after the final norm

    def lens(h, i):  # the last state is already normed: the head alone
        return model.logits(h, last_only=True)[0, -1] if i < len(states) - 1 else h[0, -1] @ model.head.weight.T
    return tensors(states, lens, n_pos, k)


def tensors(states, lens, n_pos, k):
    """states: L+1 hidden states (1, T, d); lens(h, i) -> logits (V,) at the last position."""
    hidden = torch.stack([h[0, -n_pos:] for h in states]).float()  # (L+1, P, d)
    probs = torch.stack([lens(h, i).float().softmax(-1) for i, h in enumerate(states)])  # (L+1, V)
    top = probs.topk(k, dim=-1)
    return {"hidden": hidden, "hidden_norms": torch.stack([h[0].float().norm(dim=-1) for h in states]),
            "lens_ids": top.indices, "lens_probs": top.values}


def settings_used(method, settings):
    """The settings a method runs with: the given ones over its defaults; an unknown one raises.
    AdaInfer given a "classifier" (a file's path) runs it in place of tau, with its own settings."""
    if method not in DEFAULTS:
        raise TraceError(f"unknown method {method!r} ({', '.join(DEFAULTS)})")
    name, defaults = method, DEFAULTS[method]
    if method == "adainfer" and "classifier" in settings:
        name, defaults = "adainfer with a classifier", ADAINFER_CLASSIFIER
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TraceError(f"unknown setting(s) {sorted(unknown)} for {name} (known: {sorted(defaults)})")
    if method == "kangaroo" and settings.get("l") is not None:  # l alone: the adapter-free draft from layer l
        settings = {"adapter": None, **settings}
    settings = {**defaults, **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}}
    if method == "kangaroo" and (settings["adapter"] is None) == (settings["l"] is None):
        raise TraceError("kangaroo drafts with an adapter or, adapter-free, from layer l: give one of "
                         f"adapter and l, got adapter {settings['adapter']!r} and l {settings['l']!r}")
    for k, v in settings.items():  # the settings no method checks itself (r, gamma, eta: theirs do)
        if k in SETTING_CHECKS and not SETTING_CHECKS[k][0](v):
            raise TraceError(f"setting {k} must be {SETTING_CHECKS[k][1]}, got {v!r}")
    return settings


# a NaN tau never stops; a draft_vocab of -1 drops a token (frequent[:-1]); 0 would silently mean none
SETTING_CHECKS = {
    "tau": (lambda v: is_real(v) and 0 <= v <= 1,
            "a number in [0, 1] (the gap is a difference of probabilities)"),
    "draft_vocab": (lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    "check_every": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "adapter": (lambda v: v is None or isinstance(v, str), "the path of an adapter folder, or null with l"),
    "l": (lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1 (the adapter-free exit layer)"),
    "policy": (lambda v: v in POLICIES, f"one of {', '.join(POLICIES)} (skip/kangaroo_batch.py)")}


# the settings of each method, with their defaults (what each records: skip/trace/methods.py)
DEFAULTS = {"full": {}, "unified": {"r": 2}, "skipdecode": {"r": 2}, "adainfer": {"tau": 0.8},
            "kangaroo": {"adapter": str(WEIGHTS / "kangaroo-l2"), "l": None, "gamma": 6, "eta": 0.6,
                         "draft_vocab": None, "policy": "row"}}
# AdaInfer with a stop classifier file (skip/adainfer_files.py) in place of tau; vocab: the cheap head's ids
ADAINFER_CLASSIFIER = {"classifier": None, "check_every": 1, "vocab": None}


def write(path, model_cfg, prompt, tokens, tensor_dict, method="full", settings=None, steps=(), flops_total=None,
          dtype="float32", layer_runs=None, force=False):
    """Write a trace directory atomically (trace.json last); a folder that is not a trace is refused
    unless force. dtype: the precision the model ran in (it sets compare's default tolerances);
    layer_runs: [slot, layer, [norm per position]] per layer run of the method, in order."""
    if dtype not in DTYPES:
        raise TraceError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    with atomic_dir(path, "trace.json", force) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensor_dict.items()}, str(tmp / "trace.safetensors"))
        meta = {"version": VERSION, "model": model_info(model_cfg), "method": method, "settings": settings or {},
                "dtype": dtype, "prompt": list(prompt), "tokens": list(tokens), "steps": list(steps),
                "flops": flops_total}
        if layer_runs is not None:
            meta["layer_runs"] = layer_runs
        try:
            text = json.dumps(meta, indent=1, allow_nan=False)
        except ValueError as e:  # a non-finite number: JSON has none
            raise TraceError(f"the trace of {path} holds a non-finite number, which JSON cannot hold") from e
        (tmp / "trace.json").write_text(text + "\n")
