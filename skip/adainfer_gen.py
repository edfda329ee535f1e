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

from dataclasses import dataclass, field

import torch

from .adainfer import CRFClassifier, LayerStream, Trace
from .exit_decode import ExitDecode, decode_with_exit


@dataclass
class GenResult(ExitDecode):
    traces: list[Trace] = field(default_factory=list)  # with collect=True: per token that ran every layer
    # per token fed back: [layer, FEATURES row, top-1 id] at each layer whose features were computed
    checks: list[list] = field(default_factory=list)


class StopCheck:
    """One generated token's stop decision, layer by layer (a run_layers callback)."""

    def __init__(self, model, h0, clf, checks, vocab, collect):
        self.model, self.clf, self.checks, self.collect = model, clf, checks, collect
        self.vocab, self.ids_of = vocab  # (V',) on the model's device and the same ids on the host, or None, None
        self.stream, self.state, self.rows, self.top1, self.layers, self.trace = LayerStream(h0), None, [], [], [], None

    def __call__(self, layer, h, attn_out, mlp_out):
        model, vocab, L = self.model, self.vocab, self.model.cfg.n_layers
        self.layer = layer
        self.stream.step(h, attn_out, mlp_out)
        if layer == L - 1:  # no stop: the model's own output
            self.logits = model.logits(h, last_only=True)[0, -1]  # (V,)
            if self.collect:
                self.trace = Trace(torch.tensor(self.rows + [self.stream.row(self.logits)[0]]),
                                   self.top1 + [int(self.logits.argmax())], -1)
            return True
        checked = self.clf is not None and layer in self.checks
        if not (self.collect or checked):
            return False
        cheap = model.logits(h, last_only=True, vocab=vocab)[0, -1]  # (V',)
        row, idx = self.stream.row(cheap)
        self.rows.append(row)
        self.top1.append(idx if vocab is None else self.ids_of[idx])
        self.layers.append(layer)
        if checked:
            self.state, stop = self.clf.step(self.state, self.clf.pick(row))
            if stop:  # through the cheap head, a stop stands only if the full head agrees
                full = cheap if vocab is None else model.logits(h, last_only=True)[0, -1]
                if vocab is None or int(full.argmax()) == self.top1[-1]:
                    self.logits = full
                    return True
        return False


def generate_adainfer(model, prompt, clf=None, max_new_tokens=32, check_every=1, vocab=None, fill="propagate",
                      eos=None, collect=False):
    """Greedy, batch 1. clf=None never stops (the full model, optionally collecting traces)."""
    L = model.cfg.n_layers
    checks = set(range(check_every - 1, L - 1, check_every))
    if isinstance(clf, CRFClassifier) and check_every != 1:
        raise ValueError("the CRF is a chain over consecutive layers; use check_every=1 with it")
    passes = []  # one StopCheck per fed-back token: it keeps the token's features
    cheap = (None, None) if vocab is None else (vocab.to(model.device), vocab.tolist())

    def new_check(h):
        passes.append(StopCheck(model, h, clf, checks, cheap, collect))
        return passes[-1]
    res = decode_with_exit(model, prompt, new_check, max_new_tokens, eos, fill=fill)
    return GenResult(**vars(res), traces=[c.trace for c in passes if c.trace is not None],
                     checks=[[list(x) for x in zip(c.layers, c.rows, c.top1)] for c in passes])
