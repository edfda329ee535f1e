"""FLOPs of what the decoder computes: matmul FLOPs only (2 per multiply-add).

Norms, RoPE, softmax, activations, residual adds and embedding lookups are O(n*d) and
left out, as FlopCounterMode leaves them out. Attention is counted as computed: n new
queries against all S + n visible keys (the full rectangle, masked or not); in a layer with a
sliding window W, against the last min(S + n, n + W - 1), the keys Attention reads for a row
without padding or holes (a batch's widest row may make it read more: the count is one row's).

Per layer, n new tokens, S cached tokens, d = dim, h = n_heads, h_kv = n_kv_heads,
hd = head_dim, f = ffn_dim, m = 3 matrices for SwiGLU (Llama) or 2 (OPT):
    projections  2*n*d*hd*(2*h + 2*h_kv)     q, o: d x h*hd;  k, v: d x h_kv*hd
    attention    2*2*n*(S+n)*h*hd            q @ k^T and softmax(.) @ v
    MLP          2*n*d*f*m
The plain case (h_kv = h, h*hd = d, f = 4d, m = 2) gives the familiar form:
    layer(n, S) = 2n*4d^2 + 4*n*(S+n)*d + 2n*2*4d^2 = 24*n*d^2 + 4*n*(S+n)*d
    prefill of S tokens (n = S, no cache), L layers:  L*(24*S*d^2 + 4*S^2*d) = 4*L*S*d*(6d + S)
    one decode step at context S:                     L*(24*d^2 + 4*(S+1)*d) ~ 2*params + 4*L*S*d
The LM head adds 2*n*d_e*V (V = the scored vocabulary), OPT's project_in/out 2*n*d*d_e each,
and filling a skipped layer's keys/values (state propagation) 2*n*d*hd*2*h_kv.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import layer_window


@dataclass(frozen=True)
class LayerRun:
    layer: int
    batch: int
    n: int  # new tokens
    ctx: int  # slots already cached before them


@dataclass(frozen=True)
class HeadRun:
    batch: int
    n: int  # positions scored
    vocab: int  # rows of the head used


@dataclass(frozen=True)
class EmbedRun:
    batch: int
    n: int


@dataclass(frozen=True)
class AttnRun:  # an attention-only block beside the model (Kangaroo's adapter)
    batch: int
    n: int
    ctx: int
    window: int | None = None  # the sliding window of the layer whose attention it copies


@dataclass(frozen=True)
class KVRun:  # Decoder.fill_kv: only a layer's K and V projections
    batch: int
    n: int


def attn_flops(cfg, n, S=0, window=None):
    d, hd, h, h_kv = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    proj = 2 * n * d * hd * (2 * h + 2 * h_kv)
    keys = S + n if window is None else min(S + n, n + window - 1)
    attn = 2 * 2 * n * keys * h * hd
    return proj + attn


def layer_flops(cfg, n, S=0, layer=0):
    mlp = 2 * n * cfg.dim * cfg.ffn_dim * (3 if cfg.gated_mlp else 2)
    return attn_flops(cfg, n, S, layer_window(cfg, layer)) + mlp


def kv_flops(cfg, n):
    return 2 * n * cfg.dim * cfg.head_dim * 2 * cfg.n_kv_heads


def head_flops(cfg, n, vocab=None):
    out = 2 * n * cfg.dim * cfg.embed_dim if cfg.embed_dim != cfg.dim else 0  # project_out
    return out + 2 * n * cfg.embed_dim * (cfg.vocab_size if vocab is None else vocab)


def embed_flops(cfg, n):
    return 2 * n * cfg.embed_dim * cfg.dim if cfg.embed_dim != cfg.dim else 0  # project_in


def prefill_flops(cfg, T, last_only=True):
    layers = sum(layer_flops(cfg, T, 0, i) for i in range(cfg.n_layers))
    return embed_flops(cfg, T) + layers + head_flops(cfg, 1 if last_only else T)


def decode_flops(cfg, S):
    """One generated token with S tokens already cached."""
    return embed_flops(cfg, 1) + sum(layer_flops(cfg, 1, S, i) for i in range(cfg.n_layers)) + head_flops(cfg, 1)


def total(cfg, runs):
    """FLOPs of a record from Decoder.recording(): exactly what ran."""
    flops = 0
    for r in runs:
        if isinstance(r, LayerRun):
            flops += r.batch * layer_flops(cfg, r.n, r.ctx, r.layer)
        elif isinstance(r, HeadRun):
            flops += r.batch * head_flops(cfg, r.n, r.vocab)
        elif isinstance(r, KVRun):
            flops += r.batch * kv_flops(cfg, r.n)
        elif isinstance(r, AttnRun):
            flops += r.batch * attn_flops(cfg, r.n, r.ctx, r.window)
        else:
            flops += r.batch * embed_flops(cfg, r.n)
    return flops


def per_decode_token(cfg, runs):
    """(tokens, layer runs, FLOPs) after the prompt pass of a generation record: the prompt pass
    is everything before the first one-token embedding; each batch row fed back is a token."""
    start = next((i for i, r in enumerate(runs) if isinstance(r, EmbedRun) and r.n == 1 and i > 0), len(runs))
    decode = runs[start:]
    tokens = sum(r.batch * r.n for r in decode if isinstance(r, EmbedRun))
    layers = sum(r.batch * r.n for r in decode if isinstance(r, LayerRun))
    return tokens, layers, total(cfg, decode)
