"""The two baselines that Unified Layer Skipping is compared with in its paper, at the
same target speedup r, i.e. the same average number of layers per generated token L / r.

Early exit (confidence-based, per token): run the layers in order; after each
one, apply the logit lens (final norm + LM head) and stop when the top probability reaches
a threshold tau, chosen by calibrate_threshold() so that the average layer count matches
L / r. The skipped upper layers get keys/values for this position from the exited hidden
state (state propagation, as in CALM and in AdaInfer's generation extension), so later
tokens that run those layers find no hole in the cache. Every check is an LM-head call, and
the FLOPs record counts each one. In a batch each row exits at its own layer and the batch
runs until its deepest row exits (skip/exit_decode.py): the per-token exit's cost that the
Unified paper's introduction points at, measured by skip/harness/bench_exits.py.

SkipDecode (Del Corro et al. 2023, arXiv 2307.02628, section 3): a position-dependent layer count
n_t that only decreases along the generated sequence, the same for the whole batch, decaying
linearly from n_max to n_min. Token t runs the w warm-up layers [0, w) (the paper's warm-up
layer, kept because skipping from the embeddings straight to an upper layer hurts) and then the
top n_t - w layers; the lower-middle ones are skipped. Because n_t never increases, a layer that
a token skips is skipped by every later token too, so no key/value is ever missing.
Held to the same budget as Unified Layer Skipping: over the N positions it is built for (the
new tokens of a generation, the response of a fine-tuning pair or a teacher-forced text),
sum n_t = N * |K|, K Unified's kept set at the same r, so both run the same layers per token.
"""
from __future__ import annotations

import math

from model import generate
from model.config import is_real

from .exit_decode import check_vocab, decode_with_exit
from .unified import kept_layers


# ---------------------------------------------------------------- SkipDecode
WARMUP = 1  # SkipDecode's warm-up layers


def skipdecode_schedule(L: int, r: float, n_new: int) -> list[int]:
    """n_t for t = 0..n_new-1: non-increasing, linear from n_max = 1.5 B to n_min = 0.5 B (clipped
    to [WARMUP + 1, L]), rounded so that the sum is exactly n_new * B, B = |K| of Unified at r."""
    B = len(kept_layers(L, r))
    n_max = min(L, B + B // 2)  # ours: the paper gives no n_max; 1.5 B keeps the decay gentle
    n_min = 2 * B - n_max  # symmetric around B, so the linear decay has mean B
    if n_min < WARMUP + 1:
        n_min, n_max = WARMUP + 1, 2 * B - WARMUP - 1
    if n_new == 1:
        return [B]
    linear = [n_max + (n_min - n_max) * t / (n_new - 1) for t in range(n_new)]
    n = [math.floor(x + 1e-9) for x in linear]  # non-increasing, sum <= n_new * B
    for t in range(n_new * B - sum(n)):  # the remainder, one layer each to the earliest positions
        n[t] += 1
    return n


def skipdecode_layers(L, schedule, t):
    """The layers token t runs: the warm-up layers, then the top n_t - WARMUP."""
    n = schedule[min(t, len(schedule) - 1)]
    return [*range(WARMUP), *range(L - n + WARMUP, L)]


def skipdecode_layer_sets(L, r, n):
    """The layer sets of positions 0..n-1 under the schedule built for n positions."""
    schedule = skipdecode_schedule(L, r, n)
    return [skipdecode_layers(L, schedule, t) for t in range(n)]


def generation_schedule(L, r, max_new_tokens):
    """n_t of a generation: the first new token comes from the prompt pass; the other
    max_new_tokens - 1 are fed back, and the schedule is built over those positions."""
    return skipdecode_schedule(L, r, max(1, max_new_tokens - 1))


def generate_skipdecode(model, prompts, r, max_new_tokens=32, **kw):
    L = model.cfg.n_layers
    schedule = generation_schedule(L, r, max_new_tokens)
    sets = [skipdecode_layers(L, schedule, t) for t in range(len(schedule))]
    return generate(model, prompts, max_new_tokens=max_new_tokens, decode_layers=lambda i: sets[i], **kw)


# ---------------------------------------------------------------- early exit
class ConfidenceCheck:
    """Stop after the first layer whose logit lens gives its top token probability >= tau; at
    the last layer the lens is the model's own output. With vocab (a cheap head over frequent
    tokens), a layer is first checked through those rows only: renormalised over fewer tokens,
    the top probability can only rise when the full top-1 is among them, so "go on" there is
    the full head's answer too, and a possible stop is confirmed with the full head. The
    decisions equal the full-head check's unless a token outside vocab is the full top-1 at a
    confident layer (then that stop is missed). One check serves a step's rows (exit_decode's
    protocol): each row is decided alone, the head calls are shared."""

    def __init__(self, model, tau, vocab=None):
        self.model, self.tau, self.vocab = model, tau, vocab

    def confident(self, logits):
        """logits (V,) -> bool, or (b, V) -> one bool per row."""
        return (logits.float().softmax(-1).max(-1).values >= self.tau).tolist()

    def __call__(self, layer, h, attn_out, mlp_out):  # h (b, 1, d): the rows still going
        last, rows = layer == self.model.cfg.n_layers - 1, list(range(h.shape[0]))
        if self.vocab is not None and not last:  # only the rows confident through the cheap head go on to the full one
            cheap = self.model.logits(h, last_only=True, vocab=self.vocab)[:, -1]  # (b, V')
            rows = [i for i, c in enumerate(self.confident(cheap)) if c]
            if not rows:
                return [None] * h.shape[0]
        self.logits = self.model.logits(h if len(rows) == h.shape[0] else h[rows], last_only=True)[:, -1]  # (b', V)
        stops = [True] * len(rows) if last else self.confident(self.logits)
        out = [None] * h.shape[0]
        for j, (i, stop) in enumerate(zip(rows, stops)):
            out[i] = self.logits[j] if stop else None
        return out


def generate_early_exit(model, prompts, tau, max_new_tokens=32, eos=None, forced=None, vocab=None, fill="propagate",
                        batch_size=None, **sampling):
    """prompts: a list of ids (-> an ExitDecode: tokens, exit_layers, logits, layers_run) or a
    list of such lists (-> one ExitDecode per prompt, decoded as one batch, or batch_size rows at
    a time from a queue; exit_decode.py).
    forced: feed these tokens instead of the model's own (teacher forcing, for perplexity; one
    list per prompt with a batch); vocab: 1-D ids of the cheap head that screens each check
    (exit_decode.frequent_vocab); fill: how the layers above an exit get their keys/values."""
    if not is_real(tau):
        raise ValueError(f"tau must be a finite number (above 1: never exit; NaN would never exit unsaid), "
                         f"got {tau!r}")
    vocab = check_vocab(model.cfg, vocab)
    vocab = None if vocab is None else vocab.to(model.device)
    return decode_with_exit(model, prompts, lambda h, rows: ConfidenceCheck(model, tau, vocab), max_new_tokens, eos,
                            forced, fill, batch_size, **sampling)


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
