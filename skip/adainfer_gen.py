"""AdaInfer for generation (ours). The paper decides once per prompt, for a one-token answer,
and leaves generation to future work; here every generated token gets its own stop decision,
with the paper's features and classifiers (skip/adainfer.py).

Each fed-back token runs the layers in order (the loop of skip/exit_decode.py; in a batch each
row stops at its own layer, the pass ends with the deepest row's stop); at the check layers C
its features (FEATURES) go to the stop classifier, and the first "stop" ends its pass.
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

from model.config import is_int

from .adainfer import CRFClassifier, LayerStream, Trace
from .exit_decode import ExitDecode, as_batch, check_vocab, decode_with_exit


@dataclass
class GenResult(ExitDecode):
    traces: list[Trace] = field(default_factory=list)  # with collect=True: per token that ran every layer
    # per token fed back: [layer, FEATURES row, top-1 id] at each layer whose features were computed
    checks: list[list] = field(default_factory=list)


class StopCheck:
    """One step's stop decisions, over its live rows (exit_decode's protocol): called after each
    layer l with the rows still going, it answers per row None (go on) or the logits (V,) its
    next token is chosen from. At l = L-1 (no stop) those are the model's own logits. At a check
    layer each row's features go to clf, and a stop is taken (its logits: the full head's at l)
    when verify() agrees. The head calls are shared by the rows, the features and decisions are
    each row's own. collect=True computes the features of every layer, checked or not, and a
    row that reaches the last layer leaves them in .traces[row] (a training Trace; answer -1, no
    gold answer here)."""

    def __init__(self, model, h0, clf, checks, cheap, collect):  # h0 (B, 1, d): the rows' embeddings
        self.model, self.clf, self.checks, self.collect = model, clf, checks, collect
        self.vocab, self.ids_of = cheap  # the cheap head's ids on the model's device and on the host, or None, None
        B = h0.shape[0]
        self.streams, self.states = [LayerStream(h0[b:b + 1]) for b in range(B)], [None] * B
        self.traces, self.going = [None] * B, list(range(B))
        self.layers, self.rows, self.top1 = ([[] for _ in range(B)] for _ in range(3))  # per layer with features

    def __call__(self, layer, h, attn_out, mlp_out):  # (b, 1, d) each: the rows in self.going
        for i, b in enumerate(self.going):
            self.streams[b].step(h[i:i + 1], attn_out[i:i + 1], mlp_out[i:i + 1])
        if layer == self.model.cfg.n_layers - 1:
            out = self.no_stop(h)
        else:
            out = self.decide(layer, h)
        self.going = [b for b, o in zip(self.going, out) if o is None]
        return out

    def decide(self, layer, h):
        checked = self.clf is not None and layer in self.checks
        if not (checked or self.collect):
            return [None] * len(self.going)
        lens = self.model.logits(h, last_only=True, vocab=self.vocab)[:, -1]  # (b, V') the cheap head, or the full one
        stopping = []
        for i, b in enumerate(self.going):
            row, idx = self.streams[b].row(lens[i])
            self.layers[b].append(layer)
            self.rows[b].append(row)
            self.top1[b].append(idx if self.vocab is None else self.ids_of[idx])
            if checked:
                self.states[b], stop = self.clf.decide(self.states[b], row)
                if stop:
                    stopping.append(i)
        return self.verify(h, lens, stopping)

    def no_stop(self, h):
        logits = self.model.logits(h, last_only=True)[:, -1]  # (b, V)
        if self.collect:
            for i, b in enumerate(self.going):
                self.traces[b] = Trace(torch.tensor(self.rows[b] + [self.streams[b].row(logits[i])[0]]),
                                       self.top1[b] + [int(logits[i].argmax())], -1)
        return list(logits)

    def verify(self, h, lens, stopping):
        """A stop seen through the cheap head stands only if the full head's top-1 is the same token."""
        out = [None] * len(self.going)
        if not stopping:
            return out
        if self.vocab is None:
            for i in stopping:
                out[i] = lens[i]
            return out
        full = self.model.logits(h if len(stopping) == h.shape[0] else h[stopping], last_only=True)[:, -1]  # (s, V)
        for j, (i, top) in enumerate(zip(stopping, full.argmax(-1).tolist())):
            if top == self.top1[self.going[i]][-1]:
                out[i] = full[j]
        return out

    def records(self, b):
        """Row b's [layer, FEATURES row, top-1 id] at each layer whose features were computed."""
        return [list(x) for x in zip(self.layers[b], self.rows[b], self.top1[b])]


def generate_adainfer(model, prompts, clf=None, max_new_tokens=32, check_every=1, vocab=None, fill="propagate",
                      eos=None, collect=False, batch_size=None):
    """Greedy; prompts: a list of ids (-> a GenResult) or a list of such lists (-> one GenResult
    per prompt, decoded as one batch, or batch_size rows at a time from a queue, each row stopping
    at its own layer: exit_decode.py).
    Checks after layers k-1, 2k-1, ... below the last (k = check_every); vocab: the cheap head's
    ids (V',) or None for the full head; clf=None never stops (the full model, optionally
    collecting traces)."""
    L = model.cfg.n_layers
    if not (is_int(check_every) and check_every >= 1):
        raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
    vocab = check_vocab(model.cfg, vocab)
    checks = set(range(check_every - 1, L - 1, check_every))
    if isinstance(clf, CRFClassifier) and check_every != 1:
        raise ValueError("the CRF is a chain over consecutive layers; use check_every=1 with it")
    passes = []  # per step: its StopCheck, which keeps the features of the step's live rows, and their prompts
    cheap = (None, None) if vocab is None else (vocab.to(model.device), vocab.tolist())

    def new_check(h, rows):
        passes.append((StopCheck(model, h, clf, checks, cheap, collect), rows))
        return passes[-1][0]
    batch, one = as_batch(prompts)
    res = decode_with_exit(model, batch, new_check, max_new_tokens, eos, fill=fill, batch_size=batch_size)
    out = [GenResult(**vars(r)) for r in res]
    for c, rows in passes:
        for i, r in enumerate(rows):
            out[r].checks.append(c.records(i))
            if c.traces[i] is not None:
                out[r].traces.append(c.traces[i])
    return out[0] if one else out
