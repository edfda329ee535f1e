"""AdaInfer for generation, the paper's stated future work: a stop decision for every token.

Per generated token the layers run in order; at the check layers C the token's features
(skip/adainfer.py FEATURES) go to the stop classifier, and the first "stop" ends the pass.
Three costs the paper does not face on one-token answers:
- a check is an LM-head call; for SmolLM2 the head holds as many weights as 8 layers, so
  C can be every k-th layer, and the features can come from a cheap head restricted to
  frequent tokens (`vocab`). An exit seen through the cheap head is verified with the full
  head at that layer: it stands only if the full top-1 is the cheap top-1;
- the layers above the exit have no keys/values for this position. fill="propagate" writes
  them from the exited hidden state (CALM's state propagation: one K/V projection per layer);
  fill="recompute" runs those layers for the token anyway (exact cache, no saving there);
- every check, verification and K/V fill is in the decoder's FLOPs record.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from model import KVCache, positions

from .adainfer import CRFClassifier, Trace, feature_row


@dataclass
class GenResult:
    tokens: list[int]
    exit_layers: list[int]  # per token fed back: the layer its pass stopped at
    traces: list[Trace]  # per token fed back, with collect=True: every layer's features


def _token_pass(model, tok, pos, cache, start, clf, checks, vocab, collect):
    """One generated token through the layers; returns (logits (V,), exit layer, trace, hidden state)."""
    L = model.cfg.n_layers
    captured = {}
    grab = lambda i, h, a, m: captured.update(a=a[0, -1], m=m[0, -1])  # noqa: E731
    h = model.embed_tokens(tok, pos)
    prev = {"h": h[0, -1], "a": None, "m": None}
    state, rows, top1 = None, [], []
    for layer in range(L):
        h = model.run_layers(h, pos, layers=[layer], cache=cache, start=start, callback=grab)
        cur = {"h": h[0, -1], "a": captured["a"], "m": captured["m"]}
        if (collect or (clf is not None and layer in checks)) and layer < L - 1:
            cheap = model.logits(h, last_only=True, vocab=vocab)[0, -1]
            row, idx = feature_row(cheap, cur, prev)
            rows.append(row)
            top1.append(idx if vocab is None else int(vocab[idx]))
            if clf is not None and layer in checks:
                state, stop = clf.step(state, clf.pick(row))
                if stop:
                    full = cheap if vocab is None else model.logits(h, last_only=True)[0, -1]
                    if vocab is None or int(full.argmax()) == top1[-1]:
                        return full, layer, None, h
        prev = cur
    full = model.logits(h, last_only=True)[0, -1]
    tr = Trace(torch.tensor(rows + [feature_row(full, cur, prev)[0]]), top1 + [int(full.argmax())], -1) if collect else None
    return full, L - 1, tr, h


@torch.inference_mode()
def generate_adainfer(model, prompt, clf=None, max_new_tokens=32, check_every=1, vocab=None, fill="propagate",
                      eos=None, collect=False):
    """Greedy, batch 1. clf=None never stops (the full model, optionally collecting traces)."""
    L = model.cfg.n_layers
    checks = set(range(check_every - 1, L - 1, check_every))
    if isinstance(clf, CRFClassifier) and check_every != 1:
        raise ValueError("the CRF is a chain over consecutive layers; use check_every=1 with it")
    if fill not in ("propagate", "recompute"):
        raise ValueError(f"fill={fill!r}: 'propagate' or 'recompute'")
    eos = set(model.cfg.eos_token_id if eos is None else eos)
    cache = KVCache.for_model(model.cfg, 1, len(prompt) + max_new_tokens, dtype=model.head.weight.dtype)
    logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1]
    res = GenResult([], [], [])
    for step in range(max_new_tokens):
        tok = int(logits.argmax())
        res.tokens.append(tok)
        if tok in eos or step == max_new_tokens - 1:
            break
        start = len(prompt) + step
        pos = positions(None, start, 1)
        logits, layer, tr, h = _token_pass(model, torch.tensor([[tok]]), pos, cache, start, clf, checks, vocab, collect)
        if fill == "propagate":  # the exited hidden state stands in for every skipped layer's input
            for above in range(layer + 1, L):
                model.fill_kv(above, h, pos, cache, start)
        else:  # run the skipped layers for their keys/values; the token stays the early one
            model.run_layers(h, pos, layers=range(layer + 1, L), cache=cache, start=start)
        res.exit_layers.append(layer)
        if tr is not None:
            res.traces.append(tr)
    return res


def frequent_tokens(token_lists, n=2048):
    """The n most frequent ids in the model's own outputs: a cheap head for the checks."""
    counts = Counter(t for ts in token_lists for t in ts)
    return torch.tensor(sorted(t for t, _ in counts.most_common(n)))
