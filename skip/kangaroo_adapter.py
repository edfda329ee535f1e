"""Kangaroo's adapter A (Liu et al. 2024, arXiv 2404.18911, "Early Exiting as Self-Drafting
Model"; official kangaroo/adapter.py): RMSNorm -> attention in M's head layout and RoPE -> +
residual -> RMSNorm, no MLP; the draft model M^d = H . A . M^s reads its output with M's head
(skip/kangaroo.py). Ours, after the divider: an imported adapter's own values of some of M's
settings (the official code's RoPE base and norm eps), recorded by skip/kangaroo_official.py.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from model import KVCache
from model.config import ConfigError, check
from model.decoder import Attention, Norm, rope_inv_freq, rope_tables


class AdapterError(ValueError):
    pass


class Adapter(nn.Module):
    """A = RMSNorm -> attention -> + residual -> RMSNorm, no MLP ([SD]; official kangaroo/adapter.py),
    in M's head layout, RoPE and norm eps; own: an imported adapter's own values of some of those
    (ours, own_settings below; None for adapters trained here)."""

    def __init__(self, cfg, l, own=None):
        super().__init__()
        if cfg.embed_dim != cfg.dim or cfg.pos != "rope":
            raise AdapterError("the adapter needs a RoPE model whose head reads the hidden size (Llama)")
        if not 0 < l < cfg.n_layers:
            raise AdapterError(f"exit layer l must be in [1, {cfg.n_layers - 1}], got {l}")
        self.cfg, self.l = cfg, l
        acfg, self.own, self.inv_freq = own_settings(cfg, own)  # ours; M's config and RoPE when own is None
        self.norm_in, self.attn, self.norm_out = Norm(acfg), Attention(acfg), Norm(acfg)
        # ours: token ids by frequency in the training answers, for the top-K draft head (TopKDraft)
        self.register_buffer("frequent", torch.zeros(0, dtype=torch.long))

    @classmethod
    def from_model(cls, model, l):
        """Initialise from layer l's attention (the layer M^s would run next) and the final norm."""
        a = cls(model.cfg, l)
        a.norm_in.load_state_dict(model.blocks[l].norm1.state_dict())
        a.attn.load_state_dict(model.blocks[l].attn.state_dict())
        a.norm_out.load_state_dict(model.norm.state_dict())
        return a

    def new_cache(self, batch, max_len):  # as the model's, on the adapter's device, in its dtype
        w = self.attn.wq.weight
        return KVCache(1, batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim, w.dtype, w.device)

    def rope(self, model, pos):
        """A's (cos, sin) at positions pos (B, T): M's, unless A has frequencies of its own."""
        return model.rope(pos) if self.inv_freq is None else rope_tables(self.inv_freq.to(pos.device), pos)

    def forward(self, h, rope, cache=None, start=0, attn_mask=None, impl="sdpa"):  # (B, T, d) -> (B, T, d)
        a = self.attn(self.norm_in(h), rope, attn_mask, cache, 0, start, impl)  # 0: A's cache holds one layer
        return self.norm_out(h + a)  # already normalised: the head reads it directly


# ================================================================ ours: an imported adapter's own settings
OWN = ("rope_theta", "rope_type", "norm_eps")  # M's settings an imported adapter may have its own value of


def own_settings(cfg, own):
    """(A's config, own, A's fp32 RoPE frequencies or None for M's). The official code builds A's
    RoPE with base 10000 and no scaling, whatever M's, and its norms with its own config's eps
    (skip/kangaroo_official.py records those); the frequencies are a plain attribute, as in
    the Decoder, so .to(dtype) never rounds them."""
    own = dict(own or {})
    if set(own) - set(OWN) or own.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise AdapterError(f"an adapter's own settings are some of {OWN}, got {own}")
    try:
        acfg = check(replace(cfg, **own))  # M's config with A's own values
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"bad adapter settings {own}: {e}") from None
    return acfg, own, (rope_inv_freq(acfg) if {"rope_theta", "rope_type"} & set(own) else None)
