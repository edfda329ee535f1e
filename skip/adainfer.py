"""AdaInfer (Fan et al., "Not all Layers of LLMs are Necessary during Inference", arXiv 2403.02181):
one forward pass stops at an early layer when a classifier on cheap per-layer features says the
answer is already there. The paper's method, its parts cited by their titles there:
    "Feature Selection"  after each layer, statistics of the logit lens; the paper keeps gap and
                         top prob, having also studied cosine similarities of consecutive layers
    "Classifier"         SVM or CRF on those features, fitted on one labelled row per instance and
                         layer; the simple variant is the rule gap >= tau (tau = 0.8 in the paper)
    stop signal          the pass ends at the first layer the classifier marks "stop"; no stop:
                         all layers, the model's own answer

Notation, for one prompt whose answer is its next token:
    l          layer index 0..L-1, h_l its output at the last prompt position
    p_l        softmax(head(norm(h_l))): the logit lens
    gap_l      p_l(top1) - p_l(top2)          (the paper's main feature)
    top_l      p_l(top1)                      ("top prob", the paper's second feature)
    cos_*      cosine similarity of layer l and l-1 of the hidden state, the attention output and
               the MLP output (the feature study; 0 at layer 0 for attn and MLP)
    y_l        layer l's label, 1 = "stopping here is right": gold = layer l's top-1 is the answer
               token; final = it is the full model's top-1 (the abstract's "match the final results")
Every feature costs one LM-head call at one position per layer; flops.total counts them.

Ours, after the divider at the end: the "settled" label and the oracle's stop layer. Also ours,
marked where they appear: p_l over a vocabulary restricted to some ids (`vocab`: a task's choices),
each classifier's `score` (what its decision compares, for traces) and a batch of prompts in one
pass, each row stopping at its own layer (prompt_pass). Classifier files:
skip/adainfer_files.py; task data and encode(): skip/harness/tasks.py; a stop decision per
generated token: skip/adainfer_gen.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model import check_prompts, left_pad, positions
from model.config import is_real

from .crf import CRF
from .exit_decode import as_batch, check_vocab, live_rows

FEATURES = ("gap", "top_prob", "cos_hidden", "cos_attn", "cos_mlp")
DEFAULT_FEATURES = ("gap", "top_prob")  # the paper's
LABEL_RULES = ("gold", "final", "settled")


# ---------------------------------------------------------------- features ("Feature Selection")
@dataclass
class Trace:
    feats: torch.Tensor  # (L, len(FEATURES))
    top1: list[int]  # per-layer predicted token id
    answer: int


def feature_row(logits, cur, prev):
    """FEATURES of one layer from its logit-lens logits (V',) and its outputs at the position,
    cur = {"h": hidden state, "a": attention output, "m": MLP output} (each (d,)), against the
    previous layer's prev (in fp32); also the top-1 index into logits. Computed on the model's
    device and copied to the host once."""
    top2 = logits.float().softmax(-1).topk(2)
    gap, top = top2.values[0] - top2.values[1], top2.values[0]
    zero = top2.values.new_zeros(())
    cos = [zero if prev[k] is None else F.cosine_similarity(cur[k].float(), prev[k].float(), dim=0)
           for k in ("h", "a", "m")]  # cos_hidden, cos_attn, cos_mlp
    row = torch.stack([gap, top, *cos, top2.indices[0].float()]).tolist()
    return row[:-1], int(row[-1])


class LayerStream:
    """One position's (h, attn, mlp) outputs layer after layer, for the cosine features: step()
    after each layer with run_layers' callback arguments, then row(logits) for its FEATURES."""

    def __init__(self, h0):  # (B, T, d): the embeddings, the "previous layer" of layer 0
        self.cur = {"h": h0[0, -1], "a": None, "m": None}

    def step(self, h, attn_out, mlp_out):
        self.prev, self.cur = self.cur, {"h": h[0, -1], "a": attn_out[0, -1], "m": mlp_out[0, -1]}

    def row(self, logits):
        return feature_row(logits, self.cur, self.prev)


# ---------------------------------------------------------------- the pass and its stop signal
def prompt_pass(model, prompts, vocab, on_layer):
    """The prompts, a batch (left-padded: each row's last token in the last slot), through the
    layers; after layer l, for each row still going, the logit lens at its last position (over
    `vocab` only, when given) and on_layer(row, l, FEATURES row, top-1 id) -> True ends that
    row's pass. The batch runs until its deepest row's end (ours: the paper decides one prompt at
    a time; a row's outputs past its end are not looked at, and rows do not attend to each other)."""
    prompts, vocab = check_prompts(model.cfg, prompts), check_vocab(model.cfg, vocab)
    x, pad_mask = left_pad(prompts, model.cfg.pad_token_id or 0, model.device)  # (B, T), (B, T) or None
    pos = positions(pad_mask, 0, x.shape[1], x.device)
    h = model.embed_tokens(x, pos)  # (B, T, d)
    streams, going = [LayerStream(h[b:b + 1]) for b in range(len(prompts))], list(range(len(prompts)))
    ids_of = None if vocab is None else torch.as_tensor(vocab).tolist()  # row index -> token id, on the host
    vocab = None if vocab is None else torch.as_tensor(vocab, device=x.device)

    def callback(layer, h, attn_out, mlp_out):
        nonlocal going
        h, attn_out, mlp_out = live_rows(going, len(prompts), h, attn_out, mlp_out)  # (b, T, d) each
        lens = model.logits(h, last_only=True, vocab=vocab)[:, -1]  # (b, V')
        ended = []
        for i, b in enumerate(going):
            streams[b].step(h[i:i + 1], attn_out[i:i + 1], mlp_out[i:i + 1])
            row, idx = streams[b].row(lens[i])
            ended.append(on_layer(b, layer, row, idx if vocab is None else ids_of[idx]))
        going = [b for b, e in zip(going, ended) if not e]
        return not going
    model.run_layers(h, pos, pad_mask=pad_mask, callback=callback)


@torch.inference_mode()
def predict(model, ids, clf, vocab=None):
    """AdaInfer on one prompt: layers run until clf signals stop. Returns (token id, exit layer).
    A list of prompts: one batch, each row stopping at its own layer; a list of those pairs."""
    prompts, one = as_batch(ids)
    out = [{"state": None} for _ in prompts]

    def decide(b, layer, row, pred):
        out[b]["state"], stop = clf.decide(out[b]["state"], row)
        out[b].update(pred=pred, layer=layer)
        return stop
    prompt_pass(model, prompts, vocab, decide)
    pairs = [(o["pred"], o["layer"]) for o in out]
    return pairs[0] if one else pairs


@torch.inference_mode()
def trace(model, ids, answer, vocab=None):
    """Features and predictions of every layer (one full pass): the classifiers' training rows.
    A list of prompts (and one answer each): one batch, a list of Traces."""
    prompts, one = as_batch(ids)
    rows, top1 = [[] for _ in prompts], [[] for _ in prompts]
    prompt_pass(model, prompts, vocab, lambda b, layer, row, pred: rows[b].append(row) or top1[b].append(pred))
    traces = [Trace(torch.tensor(r), t, a) for r, t, a in zip(rows, top1, [answer] if one else answer)]
    return traces[0] if one else traces


# ---------------------------------------------------------------- classifiers ("Classifier")
def labels(tr: Trace, rule="gold"):
    """y_l for every layer of a trace under a rule of LABEL_RULES."""
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule {rule!r} ({', '.join(LABEL_RULES)})")
    if rule == "settled":
        return settled_labels(tr)
    target = tr.answer if rule == "gold" else tr.top1[-1]
    return [int(t == target) for t in tr.top1]


class Classifier:
    """A stop classifier on the selected features x of each layer: step(state, x) -> (state,
    stop), where state is what a chain classifier carries from layer to layer (None at layer 0);
    decide() does the same from a whole FEATURES row; stop_at(rows) is the first layer it stops
    at, or None."""
    kind = ""

    def __init__(self, features=DEFAULT_FEATURES):
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; choose from {FEATURES}")
        self.features = tuple(features)
        self.cols = [FEATURES.index(f) for f in features]

    def pick(self, row):
        return np.asarray(row, dtype=np.float64)[self.cols]

    def decide(self, state, row):
        return self.step(state, self.pick(row))

    def stop_at(self, rows):
        state = None
        for layer, row in enumerate(rows):
            state, stop = self.decide(state, row)
            if stop:
                return layer
        return None

    def decisions(self, rows):
        """Ours (traces): (score, stop) of each row in turn, the state carried as stop_at carries it."""
        state, out = None, []
        for row in rows:
            x = self.pick(row)
            score = self.score(state, x)
            state, stop = self.step(state, x)
            out.append((score, stop))
        return out


class Threshold(Classifier):
    """The rule feature_l >= tau (the paper's gap threshold)."""
    kind = "threshold"

    def __init__(self, tau=0.8, feature="gap"):
        super().__init__((feature,))
        if not is_real(tau):
            raise ValueError(f"tau must be a finite number (NaN would never stop), got {tau!r}")
        self.tau = tau

    def score(self, state, x):
        """Ours (traces): the number step compares with tau, the feature itself."""
        return float(x[0])

    def step(self, state, x):
        return None, bool(x[0] >= self.tau)


class SVM(Classifier):
    """Linear SVM (scikit-learn) on standardised features, classes balanced; each layer alone."""
    kind = "svm"

    def fit(self, traces, rule="gold", C=1.0):
        from sklearn.svm import LinearSVC
        X = np.concatenate([t.feats.numpy()[:, self.cols] for t in traces])
        y = np.concatenate([labels(t, rule) for t in traces])
        if len(set(y)) < 2:
            raise ValueError(f"all {len(y)} training rows have label {y[0]}; the SVM needs both classes")
        self.mean, self.std = X.mean(0), X.std(0) + 1e-8
        svm = LinearSVC(C=C, class_weight="balanced", dual="auto", max_iter=10000).fit((X - self.mean) / self.std, y)
        self.w, self.b = svm.coef_[0], float(svm.intercept_[0])
        return self

    def score(self, state, x):
        """Ours (traces): the decision function w . (x - mean) / std + b; step stops iff it is > 0."""
        return float((x - self.mean) / self.std @ self.w + self.b)

    def step(self, state, x):
        return None, self.score(state, x) > 0


class CRFClassifier(Classifier):
    """A linear-chain CRF over the layers (skip/crf.py), fitted on whole traces; online, layer l
    stops when the best label path over layers 0..l ends in "stop" (no feature past l is read)."""
    kind = "crf"

    def fit(self, traces, rule="gold"):
        xs = [t.feats[:, self.cols].double() for t in traces]
        self.crf = CRF(len(self.cols)).fit(xs, [labels(t, rule) for t in traces])
        return self

    def score(self, delta, x):
        """Ours (traces): the online Viterbi margin delta[1] - delta[0] after this layer; stop iff > 0."""
        delta, _ = self.step(delta, x)
        return float(delta[1] - delta[0])

    def step(self, delta, x):
        return self.crf.step(delta, x)


# ---- extensions (ours)
def oracle_layer(tr: Trace):
    """The earliest layer from which the prediction stays the final one (a perfect classifier)."""
    l = len(tr.top1) - 1
    while l > 0 and tr.top1[l - 1] == tr.top1[-1]:
        l -= 1
    return l


def settled_labels(tr: Trace):
    """The "settled" rule: 1 from the oracle's stop layer on, where the prediction is the final
    one and stays so; early layers that agree by chance (as with 2 choices) are not taught as stops."""
    stop = oracle_layer(tr)
    return [int(l >= stop) for l in range(len(tr.top1))]
