"""The two baselines that Unified Layer Skipping is compared with in its paper, at the
same target speedup r, i.e. the same average number of layers per generated token L / r.

Early exit (confidence-based, per token, batch size 1): run the layers in order; after each
one, apply the logit lens (final norm + LM head) and stop when the top probability reaches
a threshold tau, chosen by calibrate_threshold() so that the average layer count matches
L / r. The skipped upper layers get keys/values for this position from the exited hidden
state (state propagation, as in CALM and in AdaInfer's generation extension), so later
tokens that run those layers find no hole in the cache. Every check is an LM-head call, and
the FLOPs record counts each one.

SkipDecode (Del Corro et al. 2023): a position-dependent layer count n_t that only decreases
along the generated sequence, the same for the whole batch; token t skips the lowest
L - n_t layers and runs layers [L - n_t, L). Because n_t never increases, a layer that a
token skips is skipped by every later token too, so no key/value is ever missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model import KVCache, generate, next_token, positions


# ---------------------------------------------------------------- SkipDecode
def skipdecode_schedule(L: int, r: float, n_new: int) -> list[int]:
    """n_t for t = 0..n_new-1: linear decay from n_max to n_min with mean L / r."""
    if not 1 <= r <= L:
        raise ValueError(f"target speedup r={r} must be in [1, L={L}]")
    mean = L / r
    n_max = min(L, round(1.5 * mean))
    n_min = max(1, round(2 * mean - n_max))
    if n_new == 1:
        return [round(mean)]
    return [round(n_max + (n_min - n_max) * t / (n_new - 1)) for t in range(n_new)]


def skipdecode_layers(L, schedule, t):
    """The layers token t runs: the top n_t (the lower ones are skipped)."""
    return range(L - schedule[min(t, len(schedule) - 1)], L)


def generate_skipdecode(model, prompts, r, max_new_tokens=32, **kw):
    L = model.cfg.n_layers
    schedule = skipdecode_schedule(L, r, max_new_tokens)
    return generate(model, prompts, max_new_tokens=max_new_tokens,
                    decode_layers=lambda i: skipdecode_layers(L, schedule, i), **kw)


# ---------------------------------------------------------------- early exit
@dataclass
class EarlyExit:
    tokens: list[int]
    exit_layers: list[int]  # per generated token fed back: the last layer it ran (L - 1 = none)
    logits: list[torch.Tensor]  # (V,) the logits each token was chosen from


@torch.inference_mode()
def generate_early_exit(model, prompt, tau, max_new_tokens=32, eos=None, forced=None, **sampling):
    """Batch size 1 (a per-token exit cannot keep a batch in step). prompt: list of ids.
    forced: feed these tokens instead of the model's own (teacher forcing, for perplexity)."""
    cfg = model.cfg
    L, eos = cfg.n_layers, set(cfg.eos_token_id if eos is None else eos)
    n = max_new_tokens if forced is None else len(forced)
    cache = KVCache.for_model(cfg, 1, len(prompt) + n, dtype=model.head.weight.dtype)
    logits = model(torch.tensor([prompt]), cache=cache, last_only=True)  # the prompt: all layers
    res = EarlyExit([], [], [])
    for step in range(n):
        res.logits.append(logits[0, -1].float())
        tok = next_token(logits[:, -1].float(), **sampling) if forced is None else torch.tensor([forced[step]])
        res.tokens.append(int(tok))
        if (forced is None and int(tok) in eos) or step == n - 1:
            break
        start = len(prompt) + step
        pos = positions(None, start, 1)
        h = model.embed_tokens(tok[:, None], pos)
        for layer in range(L):
            h = model.run_layers(h, pos, layers=[layer], cache=cache, start=start)
            logits = model.logits(h, last_only=True)  # the confidence check (and the final logits)
            if logits.float().softmax(-1).max() >= tau:
                break
        for above in range(layer + 1, L):  # state propagation into the skipped layers
            model.fill_kv(above, h, pos, cache, start)
        res.exit_layers.append(layer)
    return res


def calibrate_threshold(model, prompts, r, max_new_tokens=32, iters=8):
    """Bisection on tau so that the mean number of layers run per token is about L / r."""
    target = model.cfg.n_layers / r
    lo, hi = 0.0, 1.0  # tau = 0 exits at once; tau > 1 never exits
    for _ in range(iters):
        tau = (lo + hi) / 2
        exits = [e for p in prompts for e in generate_early_exit(model, p, tau, max_new_tokens, eos=[]).exit_layers]
        mean_layers = sum(e + 1 for e in exits) / len(exits)
        lo, hi = (tau, hi) if mean_layers < target else (lo, tau)
    return (lo + hi) / 2
