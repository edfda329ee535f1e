"""Decoding with a per-token early exit: the loop that the confidence baseline (skip/baselines.py)
and AdaInfer for generation (skip/adainfer_gen.py) share; only the exit decision differs.

Each generated token runs the layers in order through `run_layers`, whose callback is a fresh
per-token check: check(layer, h, attn_out, mlp_out) returns True to stop after that layer. When
the pass ends (at the exit or after the last layer), check.layer is where it ended and
check.logits (V,) what the next token is chosen from. The layers above an exit have no keys or
values for this position; `fill` says how they get them:
    "propagate"  from the exited hidden state (CALM's state propagation: one K/V projection per layer)
    "recompute"  by running those layers for the token anyway (an exact cache, no saving there)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from model import check_length, next_token, positions


@dataclass
class ExitDecode:
    tokens: list[int]
    exit_layers: list[int]  # per generated token fed back: the last layer it ran (L - 1 = no exit)
    logits: list[torch.Tensor]  # (V,) float32, the logits each token was chosen from


def frequent_vocab(token_lists, n=2048):
    """The n most frequent ids in the model's own outputs, sorted: a cheap head for the checks."""
    counts = Counter(t for ts in token_lists for t in ts)
    return torch.tensor(sorted(t for t, _ in counts.most_common(n)))


def propagate(model, h, pos, cache, start, layers):
    """The exited hidden state h stands in for the input of every skipped layer."""
    for layer in layers:
        model.fill_kv(layer, h, pos, cache, start)


@torch.inference_mode()
def decode_with_exit(model, prompt, new_check, max_new_tokens=32, eos=None, forced=None, fill="propagate",
                     **sampling):
    """Batch 1 (a per-token exit cannot keep a batch in step); prompt: token ids.
    new_check(h) -> the check of one token, given its embedding h (1, 1, d).
    forced: feed these tokens instead of the model's own (teacher forcing, for perplexity)."""
    if fill not in ("propagate", "recompute"):
        raise ValueError(f"fill={fill!r}: 'propagate' or 'recompute'")
    L = model.cfg.n_layers
    eos = set(model.cfg.eos_token_id if eos is None else eos)
    n = max_new_tokens if forced is None else len(forced)
    check_length(model.cfg, len(prompt), n)
    cache, dev = model.new_cache(1, len(prompt) + n), model.device
    logits = model(torch.tensor([prompt], device=dev), cache=cache, last_only=True)[0, -1]  # the prompt: all layers
    res = ExitDecode([], [], [])
    for step in range(n):
        res.logits.append(logits.float())
        tok = int(next_token(logits[None].float(), **sampling)[0]) if forced is None else forced[step]
        res.tokens.append(tok)
        if (forced is None and tok in eos) or step == n - 1:
            break
        start = len(prompt) + step
        pos = positions(None, start, 1, dev)
        h = model.embed_tokens(torch.tensor([[tok]], device=dev), pos)  # (1, 1, d)
        check = new_check(h)
        h = model.run_layers(h, pos, cache=cache, start=start, callback=check)  # stops at the exit
        skipped = range(check.layer + 1, L)
        if fill == "propagate":
            propagate(model, h, pos, cache, start, skipped)
        else:  # the token stays the early one; only the cache is completed
            model.run_layers(h, pos, layers=skipped, cache=cache, start=start)
        logits = check.logits
        res.exit_layers.append(check.layer)
    return res
