"""The pieces that explain a Kangaroo benchmark's speed (bench_kangaroo.py, bench_kangaroo_batch.py):
each piece of a round timed alone at B rows, the round cost and speedup they predict from a run's
own rounds, and the acceptance metrics of every peer side by side (skip/acceptance.py)."""
from __future__ import annotations


import torch

from ..acceptance import acceptance
from .timing import median_ms


@torch.inference_mode()
def piece_costs(model, adapter, l, K, ctx, gamma, batch=1):
    """Measured ms of: a plain decode step, M^s on one token, A + head (full / top-K), the lens
    head, and the deep layers on n = 1..max(gamma + 1, 8) tokens; all at context ctx, on `batch`
    rows at once (no padding mask: a batch's masks add to these)."""
    L, d, dev, B = model.cfg.n_layers, model.cfg.dim, model.device, batch
    cache = model.new_cache(B, ctx + max(gamma + 2, 9))
    model(torch.zeros(B, ctx, dtype=torch.long, device=dev), cache=cache)

    def randn(*shape):
        return torch.randn(*shape, dtype=model.dtype, device=dev)
    h, pos, tok = randn(B, 1, d), torch.tensor([[ctx]], device=dev), torch.zeros(B, 1, dtype=torch.long, device=dev)

    def run(layers, x):
        out = model.run_layers(x, torch.arange(ctx, ctx + x.shape[1], device=dev)[None], layers, cache, start=ctx)
        cache.crop(ctx)
        return out

    acache = adapter.new_cache(B, ctx + 2)
    adapter(randn(B, ctx, d), adapter.rope(model, torch.arange(ctx, device=dev)[None]), acache)
    W = model.head.weight[adapter.frequent[:K].to(dev)].contiguous()

    def draft(w):
        z = adapter(h, adapter.rope(model, pos), acache, ctx)
        acache.crop(ctx)
        return z @ w.T

    return {"step": median_ms(lambda: model.logits(run(range(L), model.embed_tokens(tok, pos)), True)),
            "shallow": median_ms(lambda: run(range(l), model.embed_tokens(tok, pos))),
            "draft_full": median_ms(lambda: draft(model.head.weight)),
            "draft_topk": median_ms(lambda: draft(W)),
            "lens_head": median_ms(lambda: model.logits(h)),
            "verify": [median_ms(lambda: model.logits(run(range(l, L), randn(B, n, d))))
                       for n in range(1, max(gamma + 2, 9))]}  # at least 1..8 positions


def round_ms(K, costs, draft_ms):
    """A round of K drafts at the measured costs: K + 1 steps of M^s, K draft heads (draft_ms each:
    A and its head), one deep pass on K + 1 positions."""
    return (K + 1) * costs["shallow"] + K * draft_ms + costs["verify"][K]


def predicted_speedup(rounds, costs, draft_ms):
    """Expected tokens per round over the cost of a round, from measured rounds and costs."""
    tokens = sum(r.accepted + 1 for r in rounds)
    ms = sum(round_ms(r.drafted, costs, draft_ms) for r in rounds)
    return tokens * costs["step"] / ms if ms else None


def metrics(runs):
    """The four acceptance metrics of skip/acceptance.py over (rounds, n_tokens) pairs, less the
    per-round official list (its mean stays)."""
    return {k: v for k, v in acceptance(runs).items() if k != "official"}


def acceptance_cells(m):
    """The four metrics as table cells: spec_bench, conditional by position, layerskip, official_mean."""
    return [m["spec_bench"], " ".join("-" if x is None else f"{x:.2f}" for x in m["conditional"]),
            m["layerskip"], m["official_mean"]]


ACCEPTANCE_HEADERS = ["tokens/pass (spec_bench)", "conditional (by position)", "accepted/drafted (layerskip)",
                      "official_mean"]


def yes_no(same):
    return "yes" if same else "NO"
