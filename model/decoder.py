"""A Llama / OPT decoder whose layers can be run, skipped, observed and cached one by one.

The per-layer API that every method in skip/ uses:
    h = model.embed_tokens(ids, pos)                            # (B, T, d)
    h = model.run_layers(h, pos, layers=range(0, l), cache=cache, start=s, pad_mask=m,
                         callback=fn)                           # any subset, in order
    z = model.logits(h, last_only=True, vocab=ids_subset)       # the "logit lens"
`start` is the cache slot of h's first token; `pad_mask` (B, start+T) marks real tokens
(False = left padding), from which attention_mask() builds the (B|1, 1, T, S) mask that
Attention reads; `pos` are the rope/learned positions, from positions().
callback(i, h, attn_out, mlp_out) sees every layer's output; returning True stops the loop. The
next layer reads this very h, so a callback may overwrite rows of it in place (a batched early
exit freezes its exited rows that way, skip/exit_decode.py).

Instrumentation is one hook: every piece of work (embedding, layer, K/V fill, head, and a
method's own pieces such as Kangaroo's adapter) is reported by emit(run, h); observing(fn)
sees them all (method traces), recording() collects them (model/flops.py counts them).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import CacheError, KVCache
from .config import Config, layer_window
from .flops import EmbedRun, HeadRun, KVRun, LayerRun
from .products import linear


# ---------------------------------------------------------------- primitives
class Norm(nn.Module):
    """RMSNorm (Llama) in fp32, or LayerNorm (OPT) by torch's kernel in the model's dtype, each as
    transformers computes it (so bf16 and fp16 runs round alike)."""

    def __init__(self, cfg: Config, width=None):  # width: cfg.dim, or head_dim for Qwen3's q/k norm
        super().__init__()
        width = width or cfg.dim
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(width)) if cfg.norm_affine else None
        self.bias = nn.Parameter(torch.zeros(width)) if cfg.norm_affine and cfg.norm == "layer" else None

    def forward(self, x):
        if self.kind == "rms":  # x / sqrt(mean(x^2) + eps): HF order is cast back, then scale
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)  # accumulates in fp32


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    # on the CPU even while the loader builds the model on meta; moved to the positions' device on first use
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device="cpu") / cfg.head_dim)
    if cfg.rope_type == "linear":  # positions / factor == frequencies / factor
        return inv / cfg.rope_factor
    if cfg.rope_type == "llama3":  # Llama 3.1: slow down low frequencies, keep high ones, blend between
        wavelen = 2 * math.pi / inv
        lo_wl = cfg.rope_original_max_len / cfg.rope_low_freq_factor
        hi_wl = cfg.rope_original_max_len / cfg.rope_high_freq_factor
        scaled = torch.where(wavelen > lo_wl, inv / cfg.rope_factor, inv)
        smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= hi_wl) & (wavelen <= lo_wl)
        return torch.where(medium, blended, scaled)
    return inv


def rope_tables(inv_freq, pos):
    """(cos, sin), each (B, 1, T, hd), at positions pos (B, T) for fp32 frequencies inv_freq (hd/2,)."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos(), emb.sin()


def rotate(x, cos, sin):
    # (B, n, T, hd) with the "rotate_half" pairing (i, i + hd/2) of HF Llama; the angles are fp32,
    # the rotation runs in x's dtype, as transformers does it (so bf16 runs round alike)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def positions(pad_mask, start, T, device="cpu"):
    """Positions of slots [start, start+T): count of real tokens before each, left pads at 0."""
    if pad_mask is None:
        return torch.arange(start, start + T, device=device)[None]  # (1, T)
    return (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]  # (B, T)


def attention_mask(pad_mask, start, T, device="cpu", window=None):
    """Boolean (B|1, 1, T, S) allowed-mask for queries at slots [start, start+T), or None,
    from the (B, S) padding mask (True = a real token).

    A query may see real keys at or before its own slot. It always sees itself, so a pad
    query never has an empty row (which would make NaNs that leak through 0 * NaN).

    window: a sliding window (Mistral, Qwen), counted in positions, not slots: a query at position
    p sees keys at positions > p - window, so a row with padding or holes sees what it sees alone.
    The mask then covers only the last slots, from the first that any query sees, and Attention
    reads only those keys: what transformers' sliding cache holds (the last window - 1 keys and
    the new ones), so that half-precision runs round as it does."""
    S = start + T
    if window is not None and S <= window:
        window = None  # no key is old enough to fall out
    if pad_mask is None and T == 1 and window is None:
        return None  # one new token, no padding: every cached key is visible
    q = torch.arange(start, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    allowed = k <= q  # (T, S)
    if window is not None:
        pos = positions(pad_mask, 0, S, device)  # (B|1, S)
        allowed = allowed & (pos[:, None, :] > pos[:, start:, None] - window)  # (B|1, T, S)
    if pad_mask is not None:
        allowed = (allowed & pad_mask[:, None, :S]) | (k == q)  # (B, T, S)
    if window is not None:  # from the first key some query sees (known on the host without padding)
        first = max(0, start - window + 1) if pad_mask is None else int(allowed.flatten(0, 1).any(0).int().argmax())
        allowed = allowed[..., first:]  # (B|1, T, S')
    return allowed.reshape(-1, 1, T, allowed.shape[-1])


class Linear(nn.Linear):
    routes = None  # a tuned route table (skip/harness/tune.py) instead of model.products' rule

    def reset_parameters(self):  # the loader builds on meta and fills every tensor from the file, and
        if not self.weight.is_meta:  # a random init on meta would import torch._dynamo (seconds)
            super().reset_parameters()

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.routes)


class Embedding(nn.Embedding):
    def reset_parameters(self):
        if not self.weight.is_meta:  # as Linear
            super().reset_parameters()


# ---------------------------------------------------------------- attention, MLP, block
class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.prescale = cfg.arch == "opt"  # OPT scales q before the scores: in bf16 that order rounds differently
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)
        self.q_norm, self.k_norm = (Norm(cfg, cfg.head_dim), Norm(cfg, cfg.head_dim)) if cfg.qk_norm else (None, None)

    def kv(self, x, rope):
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv, self.hd)  # (B, T, n_kv, hd)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = k.transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        return (k if rope is None else rotate(k, *rope)), v

    def forward(self, x, rope, attn_mask, cache, layer, start, impl):  # attn_mask: (B|1, 1, T, S) or None
        B, T, _ = x.shape
        q = self.wq(x)
        if self.prescale:
            q = q * self.hd ** -0.5
        q = q.view(B, T, self.n_heads, self.hd)  # (B, T, n_h, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # (B, n_h, T, hd)
        if rope is not None:
            q = rotate(q, *rope)
        k, v = self.kv(x, rope)
        if cache is not None:
            k, v = cache.write(layer, start, k, v)  # (B, n_kv, start+T, hd)
        elif start:
            raise CacheError("start > 0 needs a cache holding the earlier slots")
        if attn_mask is not None and attn_mask.shape[-1] < k.shape[2]:  # a sliding window's last S' keys
            k, v = k[:, :, -attn_mask.shape[-1]:], v[:, :, -attn_mask.shape[-1]:]  # (B, n_kv, S', hd)
        causal = attn_mask is None and T > 1 and start == 0
        if impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=True,
                                               scale=1.0 if self.prescale else None)
        else:  # explicit matmuls: slower, but FlopCounterMode sees them
            g = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, n_h, S, hd)
            scores = q @ k.transpose(-2, -1)  # (B, n_h, T, S)
            if not self.prescale:
                scores = scores / math.sqrt(self.hd)
            if causal:
                attn_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            y = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (B, n_h, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.act = F.silu if cfg.act == "silu" else F.relu
        self.up = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down = Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)
        self.gate = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias) if cfg.gated_mlp else None

    def forward(self, x):  # (B, T, d)
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.norm1, self.attn = Norm(cfg), Attention(cfg)
        self.norm2, self.mlp = Norm(cfg), MLP(cfg)

    def attn_input(self, h):
        return self.norm1(h) if self.pre_norm else h

    def forward(self, h, rope, attn_mask, cache, layer, start, impl):
        a = self.attn(self.attn_input(h), rope, attn_mask, cache, layer, start, impl)
        if self.pre_norm:  # Llama, OPT: h + f(norm(h))
            h = h + a
            m = self.mlp(self.norm2(h))
            return h + m, a, m
        h = self.norm1(h + a)  # OPT-350m: norm(h + f(h))
        m = self.mlp(h)
        return self.norm2(h + m), a, m


# ---------------------------------------------------------------- model
class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_embed = Embedding(cfg.max_seq_len + cfg.pos_offset, cfg.dim) if cfg.pos == "learned" else None
        self.proj_in = Linear(cfg.embed_dim, cfg.dim, bias=False) if cfg.embed_dim != cfg.dim else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.windows = [layer_window(cfg, i) for i in range(cfg.n_layers)]  # each layer's window or None
        self.norm = Norm(cfg) if cfg.final_norm else None
        self.proj_out = Linear(cfg.dim, cfg.embed_dim, bias=False) if cfg.embed_dim != cfg.dim else None
        self.head = Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # fp32 frequencies kept as a plain attribute, not a buffer, so model.to(bf16) never rounds them
        self.inv_freq = rope_inv_freq(cfg)
        self.attn_impl = "sdpa"  # "math" for explicit matmuls (FLOPs counting, debugging)
        self.observers = []  # fn(run, h) for every piece of work, while observing(fn)

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def new_cache(self, batch, max_len):
        """An empty KV cache for this model, on its device and in its dtype."""
        return KVCache.for_model(self.cfg, batch, max_len, self.dtype, self.device)

    def emit(self, run, h=None):
        """Report a piece of work (a model/flops.py record; h: a layer's output) to the observers."""
        for fn in self.observers:
            fn(run, h)

    @contextlib.contextmanager
    def observing(self, fn):
        """Call fn(run, h) for every piece of work that runs, whoever runs it (method traces)."""
        self.observers.append(fn)
        try:
            yield
        finally:
            self.observers.remove(fn)

    @contextlib.contextmanager
    def recording(self):
        """Collect what ran (layers, tokens, context, head size) for flops.total()."""
        runs = []
        with self.observing(lambda run, h: runs.append(run)):
            yield runs

    def embed_tokens(self, ids, pos):  # (B, T) -> (B, T, d)
        x = self.embed(ids)
        self.emit(EmbedRun(*ids.shape))
        if self.proj_in is not None:
            x = self.proj_in(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos + self.cfg.pos_offset)
        return x

    def rope(self, pos):
        if self.cfg.pos != "rope":
            return None
        if self.inv_freq.device != pos.device:  # moved once, kept in fp32
            self.inv_freq = self.inv_freq.to(pos.device)
        return rope_tables(self.inv_freq, pos)

    def run_layers(self, h, pos, layers=None, cache=None, start=0, pad_mask=None, callback=None):
        """Run the given layers, in the given order, on hidden states h (B, T, d)."""
        B, T, _ = h.shape
        rope, masks = self.rope(pos), {}  # masks: one per window the layers run use (None: full attention)
        for i in range(self.cfg.n_layers) if layers is None else layers:
            w = self.windows[i]
            if w not in masks:
                masks[w] = attention_mask(pad_mask, start, T, h.device, w)
            h, a, m = self.blocks[i](h, rope, masks[w], cache, i, start, self.attn_impl)
            self.emit(LayerRun(i, B, T, start), h)
            if callback is not None and callback(i, h, a, m):
                break
        return h

    def fill_kv(self, layer, h, pos, cache, start):
        """Write layer's keys/values for slots [start, start+T) computed from h, the
        hidden state standing in for that layer's input (state propagation after an exit)."""
        blk = self.blocks[layer]
        k, v = blk.attn.kv(blk.attn_input(h), self.rope(pos))
        cache.write(layer, start, k, v)
        self.emit(KVRun(h.shape[0], h.shape[1]))

    def final(self, h):
        """What the LM head reads: final norm (and OPT's project_out) of a hidden state."""
        if self.norm is not None:
            h = self.norm(h)
        return h if self.proj_out is None else self.proj_out(h)

    def logits(self, h, last_only=False, vocab=None):
        """Final norm + LM head on any hidden state; vocab: 1-D ids to score only those."""
        h = self.final(h[:, -1:] if last_only else h)
        w = self.head.weight if vocab is None else self.head.weight[vocab]  # (V', d_e)
        self.emit(HeadRun(h.shape[0], h.shape[1], w.shape[0]))
        return linear(h, w, routes=self.head.routes)  # (B, T, V')

    def forward(self, ids, cache=None, start=0, pad_mask=None, last_only=False, layers=None):
        """All layers (or the given ones) on ids (B, T) at slots [start, start+T); returns logits."""
        pos = positions(pad_mask, start, ids.shape[1], ids.device)
        h = self.run_layers(self.embed_tokens(ids, pos), pos, layers, cache=cache, start=start, pad_mask=pad_mask)
        return self.logits(h, last_only=last_only)
