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

from model import generate

from .exit_decode import decode_with_exit


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
class ConfidenceCheck:
    """Stop after the first layer whose logit lens gives its top token probability >= tau; at
    the last layer the lens is the model's own output, so every layer costs one head call."""

    def __init__(self, model, tau):
        self.model, self.tau = model, tau

    def __call__(self, layer, h, attn_out, mlp_out):
        self.layer, self.logits = layer, self.model.logits(h, last_only=True)[0, -1]  # (V,)
        return bool(self.logits.float().softmax(-1).max() >= self.tau)


def generate_early_exit(model, prompt, tau, max_new_tokens=32, eos=None, forced=None, **sampling):
    """Batch size 1; prompt: list of ids. Returns an ExitDecode (tokens, exit_layers, logits).
    forced: feed these tokens instead of the model's own (teacher forcing, for perplexity)."""
    return decode_with_exit(model, prompt, lambda h: ConfidenceCheck(model, tau), max_new_tokens, eos, forced,
                            **sampling)


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
