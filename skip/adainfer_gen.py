"""AdaInfer for generation (ours). The paper decides once per prompt, for a one-token answer,
and leaves generation to future work; here every generated token gets its own stop decision,
with the paper's features and classifiers (skip/adainfer.py).

Each fed-back token runs the layers in order (the loop of skip/exit_decode.py); at the check
layers C its features (FEATURES) go to the stop classifier, and the first "stop" ends its pass.
Three costs that a one-token answer does not have:
- a check is an LM-head call; for SmolLM2 the head holds as many weights as 8 layers, so C can
  be every k-th layer (check_every), and the features can come from a cheap head restricted to
  frequent tokens (`vocab`). An exit seen through the cheap head is verified with the full head
  at that layer: it stands only if the full top-1 is the cheap top-1;
- the layers above the exit have no keys/values for this position: fill="propagate" writes
  them from the exited hidden state (CALM's state propagation, one K/V projection per layer);
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
    """One fed-back token's stop decision: run_layers' callback after each layer l, True ends the
    token's pass; then .layer is the last layer run and .logits (V,) what the next token is chosen
    from. At l = L-1 (no stop) those are the model's own logits. At a check layer the features
    go to clf, and a stop is taken (its logits: the full head's at l) when verify() agrees.
    collect=True computes the features of every layer, checked or not, and a pass that reaches
    the last layer leaves them in .trace (a training Trace; answer -1, no gold answer here)."""

    def __init__(self, model, h0, clf, checks, cheap, collect):
        self.model, self.clf, self.checks, self.collect = model, clf, checks, collect
        self.vocab, self.ids_of = cheap  # the cheap head's ids on the model's device and on the host, or None, None
        self.stream, self.state, self.trace = LayerStream(h0), None, None
        self.layers, self.rows, self.top1 = [], [], []  # per layer whose features were computed

    def __call__(self, layer, h, attn_out, mlp_out):
        self.layer = layer
        self.stream.step(h, attn_out, mlp_out)
        if layer == self.model.cfg.n_layers - 1:
            return self.no_stop(h)
        checked = self.clf is not None and layer in self.checks
        if not (checked or self.collect):
            return False
        lens = self.model.logits(h, last_only=True, vocab=self.vocab)[0, -1]  # (V',) the cheap head, or the full one
        row, idx = self.stream.row(lens)
        self.layers.append(layer)
        self.rows.append(row)
        self.top1.append(idx if self.vocab is None else self.ids_of[idx])
        if not checked:
            return False
        self.state, stop = self.clf.decide(self.state, row)
        return stop and self.verify(h, lens)

    def no_stop(self, h):
        self.logits = self.model.logits(h, last_only=True)[0, -1]  # (V,)
        if self.collect:
            self.trace = Trace(torch.tensor(self.rows + [self.stream.row(self.logits)[0]]),
                               self.top1 + [int(self.logits.argmax())], -1)
        return True

    def verify(self, h, lens):
        """A stop seen through the cheap head stands only if the full head's top-1 is the same token."""
        full = lens if self.vocab is None else self.model.logits(h, last_only=True)[0, -1]  # (V,)
        if self.vocab is not None and int(full.argmax()) != self.top1[-1]:
            return False
        self.logits = full
        return True


def generate_adainfer(model, prompt, clf=None, max_new_tokens=32, check_every=1, vocab=None, fill="propagate",
                      eos=None, collect=False):
    """Greedy, batch 1; prompt: token ids. Checks after layers k-1, 2k-1, ... below the last
    (k = check_every); vocab: the cheap head's ids (V',) or None for the full head; clf=None never
    stops (the full model, optionally collecting traces)."""
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
