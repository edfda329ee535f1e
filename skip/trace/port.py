"""Traces from a port built on transformers, to check it against this project's (skip/trace/format.py).

    from skip.trace.port import write_transformers_trace
    write_transformers_trace(hf, ids, "runs/t-port")                  # the full model
    write_transformers_trace(hf, ids, "runs/t-port", method="unified", settings={"r": 2},
                             tokens=port_tokens, steps=[{"kept_layers": port_kept}])

The full-model part (the prompt pass's hidden states, norms and logit lens, and greedy tokens
from hf.generate) comes from any AutoModelForCausalLM whose output_hidden_states follows the
convention of docs/traces.md (the embeddings first, the last state after the final norm): Llama,
Mistral, Qwen2, OPT and their kin. A port that runs a method records what the method decided in
`steps`, one dict per step with the keys of that method's steps in our traces (docs/traces.md);
`compare` checks the keys both traces have and says which it could not.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .batch import write_batch
from .format import tensors, write


def final_norm(hf):
    """What the LM head reads a hidden state through: the final norm (and OPT's project_out)."""
    base = hf.base_model
    if hasattr(base, "norm"):  # Llama and its kin
        return base.norm
    dec = getattr(base, "decoder", None)
    if dec is not None and getattr(dec, "final_layer_norm", None) is not None:  # OPT
        proj = dec.project_out or (lambda h: h)
        return lambda h: proj(dec.final_layer_norm(h))
    raise ValueError(f"{type(hf).__name__}: no final norm found; pass norm= (the module the head reads through)")


def model_fields(config):
    """The model description a trace carries, from a transformers config."""
    n_heads = config.num_attention_heads
    return SimpleNamespace(n_layers=config.num_hidden_layers, dim=config.hidden_size, n_heads=n_heads,
                           n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
                           vocab_size=config.vocab_size)


@torch.inference_mode()
def write_transformers_trace(hf, ids, path, max_new_tokens=16, method="full", settings=None, tokens=None, steps=(),
                             norm=None, n_pos=4, k=5, force=False):
    """Write a trace of a transformers model on prompt ids (a list of token ids) to directory path.
    tokens: the port's generated tokens (default: hf.generate's greedy ones, for method "full");
    norm: the final norm for the logit lens, when final_norm() cannot find it. A batched port:
    ids a list of prompts, tokens and steps one entry per row (tokens default: each row's greedy
    tokens alone); path becomes a batch folder (skip/trace/batch.py) that compares row by row."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids  # (T,) or (B, T) input_ids
    if ids and isinstance(ids[0], (list, tuple)):
        rows = len(ids)
        tokens, steps = tokens or [None] * rows, steps or [()] * rows
        if len(tokens) != rows or len(steps) != rows:
            raise ValueError(f"{rows} prompts: give tokens and steps for each row, got {len(tokens)} and {len(steps)}")
        return write_batch(path, method, settings or {}, [
            lambda folder, i=i: write_transformers_trace(hf, ids[i], folder, max_new_tokens, method, settings,
                                                         tokens[i], steps[i], norm, n_pos, k)
            for i in range(rows)], force)
    norm = norm or final_norm(hf)
    head = hf.get_output_embeddings()
    x = torch.tensor([ids], device=hf.device)
    states = list(hf(x, output_hidden_states=True).hidden_states)  # L + 1, the last one already normed
    last = len(states) - 1

    def lens(h, i):
        return head(h if i == last else norm(h))[0, -1]
    if tokens is None:
        if method != "full":
            raise ValueError(f"method {method!r}: pass the port's own tokens (hf.generate gives the full model's)")
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False)
        tokens = out[0, len(ids):].tolist()
    write(path, model_fields(hf.config), ids, tokens, tensors(states, lens, n_pos, k), method, settings or {},
          steps, dtype=str(hf.dtype).removeprefix("torch."), force=force)
