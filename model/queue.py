"""A queue of prompts through B batch rows, as servers decode (continuous batching; ours).

The first B prompts start as one left-padded batch. When a row's prompt ends (EOS or its
budget), the next waiting prompt takes that row at the next step: it is prefilled alone, exactly
as its run alone starts, and seated in the row (KVCache.seat: its slots end where every row's
next token goes, its positions restart at 0); a prompt that ends at its first token gives the
row to the next one. Rows left without a prompt leave (KVCache.reorder), and the slots that are
padding in every row are dropped (KVCache.trim, at a step whose rows changed: no other step
makes any), so the slots in use are those of the rows in the batch. Every prompt's tokens are those of its run alone (greedy; sampled: in distribution), what
joins or leaves around it notwithstanding: tests/test_queue.py binds them.

`first_rows` and `boundary` are the queue's rule, shared by this file's plain decoding, the early
exits (skip/exit_decode.py) and Kangaroo (skip/kangaroo_batch.py).
"""
from __future__ import annotations

import torch

from .config import is_int
from .generate import check_eos, check_length, check_prompts, check_sampling, left_pad, next_token


def check_batch_size(batch_size, allow_none=False):
    if not ((allow_none and batch_size is None) or (is_int(batch_size) and batch_size >= 1)):
        raise ValueError(f"batch_size must be a positive integer{' or None (every prompt at once)' * allow_none}, "
                         f"got {batch_size!r}")


def first_rows(n_prompts, batch_size):
    """The prompts that start in the batch (the first batch_size; None: all) and those that wait."""
    B = min(batch_size or n_prompts, n_prompts)
    return list(range(B)), list(range(B, n_prompts))


def boundary(active, queue, ended, join):
    """Between steps: each batch row whose prompt has ended takes the next prompt of `queue`
    (popped; join(b, r) prefills prompt r alone and seats it in row b), then the rows whose prompt
    has still ended leave. active: the prompt of each batch row. Returns the new `active` and the
    batch rows that stay (None: all stay)."""
    active = list(active)
    for b in range(len(active)):
        while ended(active[b]) and queue:
            active[b] = queue.pop(0)
            join(b, active[b])
    keep = [b for b, r in enumerate(active) if not ended(r)]
    if len(keep) == len(active):
        return active, None
    return [active[b] for b in keep], keep


@torch.inference_mode()
def generate_queue(model, prompts, batch_size, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0,
                   generator=None, eos=None):
    """generate() (model/generate.py) over a queue of prompts through batch_size rows: the new
    tokens of each prompt (EOS included), in the prompts' order."""
    cfg = model.cfg
    prompts, eos = check_prompts(cfg, prompts), check_eos(cfg, eos)
    check_sampling(temperature, top_p, top_k)
    check_batch_size(batch_size)
    check_length(cfg, max(map(len, prompts)), max_new_tokens)
    out = [[] for _ in prompts]

    def ended(r):
        return out[r][-1] in eos or len(out[r]) == max_new_tokens

    def prefill(rows, cache):
        """The rows' prompts through the model into cache: each one's first token."""
        ids, mask = left_pad([prompts[r] for r in rows], cfg.pad_token_id or 0, model.device)  # (b, T)
        logits = model(ids, cache=cache, pad_mask=cache.open(ids.shape[1], mask), last_only=True)[:, -1]  # (b, V)
        for r, t in zip(rows, next_token(logits.float(), temperature, top_k, top_p, generator).tolist()):
            out[r].append(t)

    def join(b, r):
        solo = model.new_cache(1, len(prompts[r]))
        prefill([r], solo)
        cache.seat(b, solo)

    active, queue = first_rows(len(prompts), batch_size)
    # trim keeps only the slots of the rows in the batch: the widest holds at most a prompt and its tokens
    cache = model.new_cache(len(active), max(map(len, prompts)) + max_new_tokens)
    prefill(active, cache)
    while True:
        before, (active, keep) = active, boundary(active, queue, ended, join)
        if not active:
            return out
        if keep is not None:
            cache.reorder(keep)
        if active != before:
            cache.trim()
        toks = torch.tensor([[out[r][-1]] for r in active], device=model.device)  # (B, 1): each row's newest
        logits = model(toks, cache=cache, start=cache.lengths[0], pad_mask=cache.open(1), last_only=True)[:, -1]
        for r, t in zip(active, next_token(logits.float(), temperature, top_k, top_p, generator).tolist()):
            out[r].append(t)
