"""Generation with the KV cache: greedy or sampled (temperature, top-k, top-p), batched
with left padding, stopping per row at EOS or after max_new_tokens."""
from __future__ import annotations

import math

import torch

from .cache import KVCache


def filter_logits(logits, top_k=0, top_p=1.0):
    """Mask to -inf all but the top_k tokens, then all but the smallest set whose
    probability reaches top_p (the most likely token always stays). logits (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before the token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def left_pad(prompts, pad_id):
    """list of id lists -> ids (B, T), mask (B, T) with True on real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


def check_sampling(temperature, top_p, top_k=0):
    """NaN fails every comparison, so the test is written as 'not (all good)'."""
    if not (0 <= temperature < math.inf and 0 < top_p <= 1 and top_k >= 0):
        raise ValueError(f"need finite temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                         f"(got {temperature}, {top_p}, {top_k})")


def check_length(cfg, prompt_len, max_new_tokens):
    """Before anything is allocated: the prompt and the new tokens must fit the model's context."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"{prompt_len} prompt tokens + {max_new_tokens} new tokens exceed the model's context "
                         f"of {cfg.max_seq_len} positions")


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0,
             generator=None, eos=None, on_token=None, decode_layers=None):
    """prompts: list of token-id lists. Returns the new tokens of each prompt (EOS included).
    on_token(step, tokens (B,)) is called after each step, e.g. to stream text.
    decode_layers(i) -> the layers that generated token i (i = 0, 1, ...) runs through when it
    is fed back (default: all); the prompt always runs through all layers."""
    cfg = model.cfg
    eos = set(cfg.eos_token_id if eos is None else eos)
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    check_sampling(temperature, top_p, top_k)
    ids, mask = left_pad(prompts, cfg.pad_token_id or 0)
    B, T = ids.shape
    check_length(cfg, T, max_new_tokens)
    dtype = next(model.parameters()).dtype
    cache = KVCache.for_model(cfg, B, T + max_new_tokens, dtype=dtype)
    full_mask = torch.cat([mask, torch.ones(B, max_new_tokens, dtype=torch.bool)], dim=1)  # (B, T + n)
    padded = not bool(mask.all())

    logits = model(ids, cache=cache, mask=full_mask[:, :T] if padded else None, last_only=True)
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        tok = next_token(logits[:, -1].float(), temperature, top_k, top_p, generator)  # (B,)
        for b in range(B):
            if not done[b]:
                out[b].append(int(tok[b]))
        done |= torch.tensor([int(t) in eos for t in tok])
        if on_token is not None:
            on_token(step, tok)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        start = T + step
        logits = model(tok[:, None], cache=cache, start=start, mask=full_mask[:, :start + 1] if padded else None,
                       last_only=True, layers=None if decode_layers is None else decode_layers(step))
    return out
