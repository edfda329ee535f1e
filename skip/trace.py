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
JSON "steps": per generated token or round, what the method decided: kangaroo rounds (drafted,
accepted, rejected tokens, cache lengths after the crop), AdaInfer exits (layer, gap, top prob),
unified kept layers. "flops": the decoder's record in total (model/flops.py).

python -m skip.trace write --method full|kangaroo|unified|adainfer --prompt TEXT --out DIR
python -m skip.trace compare REFERENCE OTHER [--atol 1e-4]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import flops, generate, load_model, positions

from . import DEFAULT_MODEL, WEIGHTS
from .adainfer import Threshold
from .adainfer_gen import generate_adainfer
from .kangaroo import generate_kangaroo, load_adapter
from .unified import generate_unified, kept_layers

VERSION = 1
MODEL_FIELDS = ("n_layers", "dim", "n_heads", "n_kv_heads", "vocab_size")


class TraceError(ValueError):
    pass


def model_info(cfg):
    return {k: getattr(cfg, k) for k in MODEL_FIELDS}


@torch.inference_mode()
def prompt_pass(model, ids, n_pos=4, k=5):
    """The tensors of a trace from our decoder's per-layer API."""
    x = torch.tensor([ids])
    pos = positions(None, 0, x.shape[1])
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


def run_method(model, ids, method, max_new_tokens, settings):
    """Generated tokens and the per-step records of one method."""
    if method == "full":
        return generate(model, [ids], max_new_tokens=max_new_tokens)[0], []
    if method == "unified":
        r = settings.get("r", 2)
        toks = generate_unified(model, [ids], r, max_new_tokens=max_new_tokens)[0]
        return toks, [{"kept_layers": kept_layers(model.cfg.n_layers, r)}]
    if method == "adainfer":
        out = generate_adainfer(model, ids, Threshold(settings.get("tau", 0.8)), max_new_tokens, collect=False)
        return out.tokens, [{"exit_layer": e} for e in out.exit_layers]
    if method == "kangaroo":
        adapter = load_adapter(settings["adapter"], model)
        steps = []

        def on_round(tokens, caches):
            steps.append({"cache_lengths": caches[0].lengths[:], "adapter_cache_length": caches[1].lengths[0]})
        out = generate_kangaroo(model, ids, adapter, max_new_tokens=max_new_tokens, gamma=settings.get("gamma", 6),
                                eta=settings.get("eta", 0.6), draft_vocab=settings.get("draft_vocab"), on_round=on_round)
        for s, r in zip(steps, out.rounds):
            s.update(drafted=r.drafted, accepted=r.accepted)
        return out.tokens, steps
    raise TraceError(f"unknown method {method!r} (full, kangaroo, unified, adainfer)")


def write(path, model_cfg, prompt, tokens, tensor_dict, method="full", settings=None, steps=(), flops_total=None):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensor_dict.items()}, str(path / "trace.safetensors"))
    (path / "trace.json").write_text(json.dumps({
        "version": VERSION, "model": model_info(model_cfg), "method": method, "settings": settings or {},
        "prompt": list(prompt), "tokens": list(tokens), "steps": list(steps), "flops": flops_total}, indent=1) + "\n")


def trace(model, ids, path, method="full", max_new_tokens=16, settings=None):
    """Write the trace of our decoder running method on prompt ids to directory path."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in (settings or {}).items()}
    with model.recording() as runs:
        tokens, steps = run_method(model, ids, method, max_new_tokens, settings)
    write(path, model.cfg, ids, tokens, prompt_pass(model, ids), method, settings, steps, flops.total(model.cfg, runs))


def read(path):
    path = Path(path)
    try:
        meta = json.loads((path / "trace.json").read_text())
        t = load_file(str(path / "trace.safetensors"))
    except FileNotFoundError as e:
        raise TraceError(f"no trace in {path}: {Path(e.filename).name} is missing") from e
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise TraceError(f"trace in {path} is truncated or corrupted: {e}") from e
    if meta.get("version") != VERSION:
        raise TraceError(f"trace in {path} has version {meta.get('version')}; this reader understands {VERSION}")
    return meta, t


def compare(ref_path, other_path, atol=1e-4, rtol=1e-4):
    """Check other against ref; returns [] or plain-words findings, the first divergence first."""
    (ref, rt), (oth, ot) = read(ref_path), read(other_path)
    if ref["model"] != oth["model"]:
        raise TraceError(f"traces are of different models: {ref['model']} vs {oth['model']}")
    if ref["prompt"] != oth["prompt"]:
        return ["the prompts differ: nothing else is comparable"]
    out = []
    if rt["hidden"].shape != ot["hidden"].shape:
        return [f"hidden states have shape {tuple(ot['hidden'].shape)}, reference {tuple(rt['hidden'].shape)}"]
    diff = (rt["hidden"] - ot["hidden"]).abs()  # (L+1, P, d)
    bad = diff > atol + rtol * rt["hidden"].abs()
    if bad.any():
        i, p, _ = (int(x) for x in bad.nonzero()[0])
        where = "the embeddings" if i == 0 else f"layer {i - 1}" + (" (after the final norm)" if i == diff.shape[0] - 1 else "")
        out.append(f"hidden state diverges first at {where}, stored position {p}: max |diff| {float(diff[i].max()):.3g} "
                   f"> atol {atol} + rtol {rtol} * |ref|")
    lens = (rt["lens_ids"][:, 0] != ot["lens_ids"][:, 0]).nonzero()
    if len(lens):
        out.append(f"logit-lens top-1 differs first at hidden index {int(lens[0])}: "
                   f"{int(rt['lens_ids'][lens[0], 0])} vs {int(ot['lens_ids'][lens[0], 0])}")
    for s, (a, b) in enumerate(zip(ref["tokens"], oth["tokens"])):
        if a != b:
            out.append(f"generated token {s} differs: reference {a}, other {b}")
            break
    else:
        if len(ref["tokens"]) != len(oth["tokens"]):
            out.append(f"{len(oth['tokens'])} generated tokens, reference {len(ref['tokens'])}")
    if ref["method"] == oth["method"] and ref["settings"] == oth["settings"]:
        for s, (a, b) in enumerate(zip(ref["steps"], oth["steps"])):
            if a != b:
                out.append(f"step {s} of {ref['method']} differs: reference {a}, other {b}")
                break
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    w.add_argument("--method", default="full", choices=["full", "kangaroo", "unified", "adainfer"])
    w.add_argument("--prompt", required=True)
    w.add_argument("--max-new-tokens", type=int, default=16)
    w.add_argument("--settings", default="{}", help='JSON, e.g. \'{"gamma": 6, "eta": 0.6}\' or \'{"r": 2}\'')
    w.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("reference", type=Path)
    c.add_argument("other", type=Path)
    c.add_argument("--atol", type=float, default=1e-4)
    c.add_argument("--rtol", type=float, default=1e-4)
    a = ap.parse_args(argv)
    if a.cmd == "compare":
        found = compare(a.reference, a.other, a.atol, a.rtol)
        print("\n".join(found) if found else "the traces agree within the tolerances")
        sys.exit(1 if found else 0)
    from tokenizer import encode_chat, load_tokenizer
    model = load_model(a.model)
    settings = json.loads(a.settings)
    if a.method == "kangaroo":
        settings.setdefault("adapter", str(WEIGHTS / "kangaroo-l2"))
    ids = encode_chat(load_tokenizer(a.model), a.prompt)
    trace(model, ids, a.out, a.method, a.max_new_tokens, settings)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
