"""Preallocated KV cache, indexed by slot, with an explicit valid length per layer.

A slot is a column of the (B, max_len) buffer; with left padding, slot t holds the t-th
token of every row (a pad or a real token). Each layer l holds keys/values for slots
[0, lengths[l]) and nothing else, so layers may run ahead of one another:
- Kangaroo's shallow layers draft ahead of the deep ones;
- Unified Layer Skipping's skipped layers stop at the prompt length forever;
- an early-exit method may fill a skipped layer's slots from another state
  (Decoder.fill_kv) or leave them, in which case that layer can never run again.
Writes must start exactly at a layer's length, so a layer can never attend to a slot
it did not fill: the gap raises instead of reading stale memory.
Rolling back rejected drafts is crop().
Memory grows with use, in chunks of CHUNK slots, up to max_len: a generous max_new_tokens
or gamma bounds the cache but does not allocate it.
"""
from __future__ import annotations

import torch


class CacheError(RuntimeError):
    pass


CHUNK = 256


class KVCache:
    def __init__(self, n_layers, batch, max_len, n_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
        empty = (n_layers, batch, n_kv_heads, 0, head_dim)
        self.k = torch.zeros(empty, dtype=dtype, device=device)  # (L, B, n_kv, capacity, hd)
        self.v = torch.zeros(empty, dtype=dtype, device=device)  # (L, B, n_kv, capacity, hd)
        self.lengths = [0] * n_layers
        self.max_len = max_len

    def _grow(self, end):
        capacity = min(self.max_len, -(-end // CHUNK) * CHUNK)  # next multiple of CHUNK, at most max_len
        old = self.k.shape[3]
        for name in ("k", "v"):
            t = getattr(self, name)
            grown = t.new_zeros(t.shape[:3] + (capacity, t.shape[4]))  # (L, B, n_kv, capacity, hd)
            grown[:, :, :, :old] = t
            setattr(self, name, grown)

    @classmethod
    def for_model(cls, cfg, batch, max_len, dtype=torch.float32, device="cpu"):
        return cls(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype, device)

    def write(self, layer, start, k, v):
        """Store k, v (B, n_kv, T, hd) at slots [start, start+T); return all valid k, v."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise CacheError(f"KV cache holds {self.max_len} positions; asked to write slots "
                             f"[{start}, {end}). Make a larger cache (max_len).")
        if start != self.lengths[layer]:
            raise CacheError(f"layer {layer} holds {self.lengths[layer]} valid positions; cannot write "
                             f"at slot {start} (crop it, or fill slots {self.lengths[layer]}..{start - 1} first)")
        if end > self.k.shape[3]:
            self._grow(end)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        self.lengths[layer] = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, end, hd)

    def reorder(self, rows):
        """Row i becomes the old row rows[i] (B', ): beam search copies and drops beams this way."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]  # (L, B', n_kv, capacity, hd)

    def crop(self, length, layers=None):
        """Forget every slot >= length (in the given layers, default all)."""
        for i in range(len(self.lengths)) if layers is None else layers:
            self.lengths[i] = min(self.lengths[i], length)
