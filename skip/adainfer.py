"""AdaInfer (Fan et al., "Not all Layers of LLMs are Necessary during Inference", arXiv 2403.02181).

Notation (the paper's method: features, classifier, stop signal), for one prompt whose
answer is its next token:
    l          layer index 0..L-1, h_l its output at the last prompt position
    p_l        softmax(head(norm(h_l))): the logit lens, over the full vocabulary or the choices
    gap_l      p_l(top1) - p_l(top2)          (the paper's main feature)
    top_l      p_l(top1)                      (its second feature)
    cos_*      cosine similarity of layer l and l-1 of the hidden state, the attention output and
               the MLP output (the paper's feature study; 0 at layer 0 for attn and MLP)
    classifier SVM or CRF on the chosen features, or "gap >= tau" (tau = 0.8 in the paper);
               inference stops at the first layer marked "stop"; no stop: all layers.
Labels (one row per instance and layer): "gold" = layer l's top-1 is the answer token;
"final" = layer l's top-1 equals the full model's top-1; "settled" (ours) = it does, and so
does every layer after l: the oracle's stop layer and all later ones (early layers that agree
by chance, as with 2 choices, are not taught as stops).
Every feature costs one LM-head call at one position per layer; flops.total counts them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import positions
from model.files import write_text_atomic

from .crf import CRF

FEATURES = ("gap", "top_prob", "cos_hidden", "cos_attn", "cos_mlp")
DEFAULT_FEATURES = ("gap", "top_prob")


def encode(tok, inst):
    """(prompt ids, answer id, choice ids or None); the answer and choices must be one token
    (or, with inst.first_token, the answer is the first token of its text)."""
    ids = tok.encode(inst.prompt)

    def one_token(cont, first=False):
        full = tok.encode(inst.prompt + cont)
        if len(full) <= len(ids) or full[:len(ids)] != ids or (len(full) != len(ids) + 1 and not first):
            raise ValueError(f"answer {cont!r} is not a single token after the prompt {inst.prompt[-40:]!r}")
        return full[len(ids)]
    choices = None if inst.choices is None else [one_token(c) for c in inst.choices]
    return ids, one_token(inst.answer, inst.first_token), choices


@dataclass
class Trace:
    feats: torch.Tensor  # (L, len(FEATURES))
    top1: list[int]  # per-layer predicted token id
    answer: int


class LayerStream:
    """One position's (h, attn, mlp) outputs layer after layer, for the cosine features: step()
    after each layer with run_layers' callback arguments, then row(logits) for its FEATURES."""

    def __init__(self, h0):  # (B, T, d): the embeddings, the "previous layer" of layer 0
        self.cur = {"h": h0[0, -1], "a": None, "m": None}

    def step(self, h, attn_out, mlp_out):
        self.prev, self.cur = self.cur, {"h": h[0, -1], "a": attn_out[0, -1], "m": mlp_out[0, -1]}

    def row(self, logits):
        return feature_row(logits, self.cur, self.prev)


def feature_row(logits, cur, prev):
    """FEATURES of one layer from its logit-lens logits (V',) and its (h, attn, mlp) outputs
    at the position, against the previous layer's (in fp32); also the top-1 index into logits.
    Computed on the model's device and copied to the host once."""
    top2 = logits.float().softmax(-1).topk(2)
    zero = top2.values.new_zeros(())
    cos = [zero if prev[k] is None else F.cosine_similarity(cur[k].float(), prev[k].float(), dim=0) for k in "ham"]
    row = torch.stack([top2.values[0] - top2.values[1], top2.values[0], *cos, top2.indices[0].float()]).tolist()
    return row[:-1], int(row[-1])


def prompt_pass(model, ids, vocab, on_layer):
    """The prompt through the layers; after each, on_layer(layer, feature row, predicted id) ->
    True stops the pass there (run_layers' callback)."""
    x = torch.tensor([ids], device=model.device)
    pos = positions(None, 0, x.shape[1], x.device)
    h = model.embed_tokens(x, pos)  # (1, T, d)
    stream = LayerStream(h)
    ids_of = None if vocab is None else torch.as_tensor(vocab).tolist()  # row index -> token id, on the host
    vocab = None if vocab is None else torch.as_tensor(vocab, device=x.device)

    def callback(layer, h, attn_out, mlp_out):
        stream.step(h, attn_out, mlp_out)
        row, idx = stream.row(model.logits(h, last_only=True, vocab=vocab)[0, -1])
        return on_layer(layer, row, idx if vocab is None else ids_of[idx])
    model.run_layers(h, pos, callback=callback)


@torch.inference_mode()
def trace(model, ids, answer, vocab=None) -> Trace:
    """Features and predictions of every layer (one full pass), for training and analysis."""
    rows, top1 = [], []
    prompt_pass(model, ids, vocab, lambda layer, row, pred: rows.append(row) or top1.append(pred))
    return Trace(torch.tensor(rows), top1, answer)


def oracle_layer(tr: Trace):
    """The earliest layer from which the prediction stays the final one (a perfect classifier)."""
    l = len(tr.top1) - 1
    while l > 0 and tr.top1[l - 1] == tr.top1[-1]:
        l -= 1
    return l


LABEL_RULES = ("gold", "final", "settled")


def labels(tr: Trace, rule="gold"):
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule {rule!r} ({', '.join(LABEL_RULES)})")
    if rule == "settled":
        stop = oracle_layer(tr)
        return [int(l >= stop) for l in range(len(tr.top1))]
    target = tr.answer if rule == "gold" else tr.top1[-1]
    return [int(t == target) for t in tr.top1]


# ---------------------------------------------------------------- stop classifiers
class Classifier:
    """Selects features and decides online: step(state, x) -> (state, stop) for one layer's
    selected features x; stop_at(rows) -> the first stop layer or None."""
    kind = ""

    def __init__(self, features=DEFAULT_FEATURES):
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; choose from {FEATURES}")
        self.features = tuple(features)
        self.cols = [FEATURES.index(f) for f in features]

    def pick(self, row):
        return np.asarray(row, dtype=np.float64)[self.cols]

    def stop_at(self, rows):
        state = None
        for layer, row in enumerate(rows):
            state, stop = self.step(state, self.pick(row))
            if stop:
                return layer
        return None

    def save(self, path, model_cfg, trained_on=None):
        d = {"kind": self.kind, "features": self.features, "params": self.params(), "trained_on": trained_on,
             "model": {"n_layers": model_cfg.n_layers, "dim": model_cfg.dim, "vocab_size": model_cfg.vocab_size}}
        write_text_atomic(path, json.dumps(d))


class Threshold(Classifier):
    kind = "threshold"

    def __init__(self, tau=0.8, feature="gap"):
        super().__init__((feature,))
        self.tau = tau

    def step(self, state, x):
        return None, bool(x[0] >= self.tau)

    def params(self):
        return {"tau": self.tau}


class SVM(Classifier):
    """Linear SVM (scikit-learn) on standardised features, classes balanced."""
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

    def step(self, state, x):
        return None, bool((x - self.mean) / self.std @ self.w + self.b > 0)

    def params(self):
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "w": self.w.tolist(), "b": self.b}


class CRFClassifier(Classifier):
    kind = "crf"

    def fit(self, traces, rule="gold"):
        xs = [t.feats[:, self.cols].double() for t in traces]
        self.crf = CRF(len(self.cols)).fit(xs, [labels(t, rule) for t in traces])
        return self

    def step(self, delta, x):
        delta = self.crf.step(delta, x)
        return delta, bool(delta[1] > delta[0])

    def params(self):
        return self.crf.to_json()


class ClassifierError(ValueError):
    pass


def _numbers(path, p, key, shape):
    """p[key] as a float64 array of the given shape, every entry a finite JSON number."""
    a = np.asarray(p.get(key), dtype=object)
    if a.shape != shape or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a.flat):
        raise ClassifierError(f"{path}: params.{key} must be numbers of shape {shape}, got {p.get(key)!r:.80}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ClassifierError(f"{path}: params.{key} holds a non-finite value")
    return a


def load_classifier(path, model_cfg, other_model=False):
    """Read a classifier written by Classifier.save, checking every field before it is used.
    One fitted for a model of another shape is refused unless other_model=True: the features
    (probabilities, cosines) do not depend on the shape, so it runs, but it was not fitted here."""
    try:
        d = json.loads(Path(path).read_text())
        kind, features, p = d["kind"], d["features"], d["params"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ClassifierError(f"{path}: not a classifier file ({type(e).__name__}: {e})") from e
    want = {"n_layers": model_cfg.n_layers, "dim": model_cfg.dim, "vocab_size": model_cfg.vocab_size}
    if d.get("model") != want:
        if not other_model:
            raise ClassifierError(f"{path} was fitted for a model with {d.get('model')}, not {want} "
                                  "(other_model=True applies it anyway)")
        print(f"{path}: fitted on {d.get('trained_on') or 'an unnamed model'} {d.get('model')}; "
              f"applied to a model with {want}")
    if kind not in ("threshold", "svm", "crf") or not isinstance(p, dict):
        raise ClassifierError(f"{path}: unknown kind {kind!r} (threshold, svm, crf)")
    if not (isinstance(features, list) and features and set(features) <= set(FEATURES)
            and (kind != "threshold" or len(features) == 1)):
        raise ClassifierError(f"{path}: features {features!r} are not a list of {FEATURES}"
                              + (" with one entry" if kind == "threshold" else ""))
    n_feat = len(features)
    if kind == "threshold":
        return Threshold(float(_numbers(path, p, "tau", ())), features[0])
    clf = {"svm": SVM, "crf": CRFClassifier}[kind](features)
    if kind == "svm":
        clf.mean, clf.std, clf.w = (_numbers(path, p, k, (n_feat,)) for k in ("mean", "std", "w"))
        clf.b = float(_numbers(path, p, "b", ()))
        if (clf.std <= 0).any():
            raise ClassifierError(f"{path}: params.std must be positive, got {clf.std.tolist()}")
    else:
        clf.crf = CRF.from_json({"W": _numbers(path, p, "W", (2, n_feat)), "b": _numbers(path, p, "b", (2,)),
                                 "T": _numbers(path, p, "T", (2, 2))})
    return clf


# ---------------------------------------------------------------- inference
@torch.inference_mode()
def predict(model, ids, clf, vocab=None):
    """AdaInfer on one prompt: layers run until clf says stop. Returns (token id, exit layer)."""
    out = {"state": None}

    def decide(layer, row, pred):
        out["state"], stop = clf.step(out["state"], clf.pick(row))
        out.update(pred=pred, layer=layer)
        return stop
    prompt_pass(model, ids, vocab, decide)
    return out["pred"], out["layer"]
