"""AdaInfer's stop classifiers (skip/adainfer.py) on disk: one JSON file each (no pickle),
every field checked when it is read, before anything uses it.

    {"kind": "threshold" | "svm" | "crf", "features": [names from FEATURES],
     "params": threshold {"tau"}; svm {"mean", "std", "w", "b"}; crf {"kind", "W", "b", "T"},
     "trained_on": a free-text name or null, "model": {"n_layers", "dim", "vocab_size"}}

The parameters' range, so that every score is a finite number: the features are probabilities
and cosines (|x| <= 1), and a fit gives parameters of the order of 1 to 100 (LinearSVC on
standardised features; SVM.fit's std is at least its 1e-8; the CRF's weights). A parameter is
refused beyond |v| <= PARAM_MAX = 1e6 or subnormal (0 < |v| < 2.2e-308, which no fit gives), and
std below STD_MIN = 1e-8: within these, |w . (x - mean) / std + b| < 1e21 and the CRF's margins
stay finite, where 1e308 overflowed to inf and inf - inf to NaN, which never stops. A threshold
is one of its feature's values: in [0, 1] for gap and top_prob, in [-1, 1] for the cosines.
"""
from __future__ import annotations

import json
import warnings

import numpy as np

from model.jsonfile import read_json
from weights.files import write_text_atomic

from .adainfer import FEATURES, SVM, CRFClassifier, Threshold
from .crf import CRF


class ClassifierError(ValueError):
    pass


PARAM_MAX, STD_MIN = 1e6, 1e-8
TAU_RANGE = {"gap": (0.0, 1.0), "top_prob": (0.0, 1.0)}  # the cosines: [-1, 1]


def model_shape(cfg):
    return {"n_layers": cfg.n_layers, "dim": cfg.dim, "vocab_size": cfg.vocab_size}


def params(clf):
    if clf.kind == "threshold":
        return {"tau": clf.tau}
    if clf.kind == "svm":
        return {"mean": clf.mean.tolist(), "std": clf.std.tolist(), "w": clf.w.tolist(), "b": clf.b}
    return clf.crf.to_json()


def save_classifier(clf, path, model_cfg, trained_on=None):
    d = {"kind": clf.kind, "features": clf.features, "params": params(clf), "trained_on": trained_on,
         "model": model_shape(model_cfg)}
    try:
        text = json.dumps(d, allow_nan=False)
    except ValueError as e:
        raise ClassifierError(f"{path}: a parameter is not finite, which JSON cannot hold") from e
    write_text_atomic(path, text)


def _numbers(path, p, key, shape):
    """p[key] as a float64 array of the given shape, every entry a finite JSON number in range (above)."""
    a = np.asarray(p.get(key), dtype=object)
    if a.shape != shape or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a.flat):
        raise ClassifierError(f"{path}: params.{key} must be numbers of shape {shape}, got {p.get(key)!r:.80}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ClassifierError(f"{path}: params.{key} holds a non-finite value")
    if (np.abs(a) > PARAM_MAX).any() or ((a != 0) & (np.abs(a) < np.finfo(np.float64).tiny)).any():
        raise ClassifierError(f"{path}: params.{key} holds a value beyond |v| <= {PARAM_MAX:g} or subnormal; "
                              "no fit gives one and its scores would overflow")
    return a


def load_classifier(path, model_cfg, other_model=False):
    """Read a classifier written by save_classifier. One fitted for a model of another shape is
    refused unless other_model=True, and then applied with a warning: the features
    (probabilities, cosines) do not depend on the shape, so it runs, but it was not fitted here."""
    try:
        d = read_json(path, "classifier file", 64 << 20)
        kind, features, p = d["kind"], d["features"], d["params"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ClassifierError(f"{path}: not a classifier file ({type(e).__name__}: {e})") from e
    want = model_shape(model_cfg)
    if d.get("model") != want:
        if not other_model:
            raise ClassifierError(f"{path} was fitted for a model with {d.get('model')}, not {want} "
                                  "(other_model=True applies it anyway)")
        warnings.warn(f"{path}: fitted on {d.get('trained_on') or 'an unnamed model'} {d.get('model')}; "
                      f"applied to a model with {want}", stacklevel=2)
    if kind not in ("threshold", "svm", "crf") or not isinstance(p, dict):
        raise ClassifierError(f"{path}: unknown kind {kind!r} (threshold, svm, crf)")
    if not (isinstance(features, list) and features and all(isinstance(f, str) for f in features)
            and set(features) <= set(FEATURES) and len(set(features)) == len(features)
            and (kind != "threshold" or len(features) == 1)):
        raise ClassifierError(f"{path}: features {features!r:.80} are not a list of distinct names of {FEATURES}"
                              + (" with one entry" if kind == "threshold" else ""))
    n_feat = len(features)
    if kind == "threshold":
        tau, (lo, hi) = float(_numbers(path, p, "tau", ())), TAU_RANGE.get(features[0], (-1.0, 1.0))
        if not lo <= tau <= hi:
            raise ClassifierError(f"{path}: params.tau {tau} is outside [{lo:g}, {hi:g}], the values {features[0]} "
                                  "takes: it would stop always or never")
        return Threshold(tau, features[0])
    if kind == "svm":
        clf = SVM(features)
        clf.mean, clf.std, clf.w = (_numbers(path, p, k, (n_feat,)) for k in ("mean", "std", "w"))
        clf.b = float(_numbers(path, p, "b", ()))
        if (clf.std < STD_MIN).any():
            raise ClassifierError(f"{path}: params.std must be positive, at least {STD_MIN:g} (SVM.fit adds it), "
                                  f"got {clf.std.tolist()}")
        return clf
    clf = CRFClassifier(features)
    clf.crf = CRF.from_json({"W": _numbers(path, p, "W", (2, n_feat)), "b": _numbers(path, p, "b", (2,)),
                             "T": _numbers(path, p, "T", (2, 2))})
    return clf
