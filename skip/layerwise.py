"""A cache-free forward in which every position runs its own set of layers.

runs[l] (T,) says which slots run layer l; the others pass their hidden state through
unchanged. This is what decoding with a layer-skipping method computes, written without
a KV cache: a slot that skips layer l still exposes keys/values computed from the hidden
state it carries there, which is exactly what CALM-style state propagation writes into
the cache (and what the later slots of Unified Layer Skipping and SkipDecode never read).
It serves as the no-cache reference in the tests and as the training forward for
fine-tuning with a skip pattern (the prompt runs all layers, the response only some).
"""
from __future__ import annotations

import torch

from model import positions


def layerwise_forward(model, ids, runs, pad_mask=None):
    """ids (B, T); runs (L, T) bool; pad_mask (B, T) for left padding. Returns logits (B, T, V)."""
    T = ids.shape[1]
    pos = positions(pad_mask, 0, T, ids.device)
    h = model.embed_tokens(ids, pos)  # (B, T, d)
    runs = runs.to(ids.device)
    for layer, used in enumerate(runs.any(1).tolist()):
        if used:
            out = model.run_layers(h, pos, layers=[layer], pad_mask=pad_mask)  # (B, T, d)
            h = torch.where(runs[layer][None, :, None], out, h)
    return model.logits(h)


def prompt_then(L, T_prompt, layer_sets):
    """runs (L, T) for a prompt of T_prompt slots through all layers, then one slot per
    entry of layer_sets (the layers that slot runs)."""
    runs = torch.zeros(L, T_prompt + len(layer_sets), dtype=torch.bool)
    runs[:, :T_prompt] = True
    for t, layers in enumerate(layer_sets):
        runs[list(layers), T_prompt + t] = True
    return runs
