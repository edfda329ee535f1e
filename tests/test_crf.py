"""The CRF against brute-force enumeration of every label sequence."""
import itertools
import json

import torch

from skip.adainfer import FEATURES, CRFClassifier
from skip.crf import CRF


def random_crf(F, seed):
    crf = CRF(F, seed)
    g = torch.Generator().manual_seed(seed + 100)
    crf.W = torch.randn(2, F, generator=g, dtype=torch.float64)
    crf.b = torch.randn(2, generator=g, dtype=torch.float64)
    crf.T = torch.randn(2, 2, generator=g, dtype=torch.float64)
    return crf


def all_scores(crf, x):
    return {y: float(crf.score(x, list(y))) for y in itertools.product([0, 1], repeat=len(x))}


def test_viterbi_and_log_partition_equal_brute_force():
    for seed in range(20):
        L, F = 1 + seed % 7, 3
        crf = random_crf(F, seed)
        x = torch.randn(L, F, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        scores = all_scores(crf, x)
        best = max(scores, key=scores.get)
        path, value = crf.viterbi(x)
        assert tuple(path) == best and abs(value - scores[best]) < 1e-9
        assert abs(float(crf.log_partition(x)) - float(torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), 0))) < 1e-9


def test_online_stop_is_the_first_prefix_whose_best_path_ends_in_stop():
    """Through the classifier that AdaInfer runs: its features picked from whole FEATURES rows."""
    stops = []
    for seed in range(20):
        L, clf = 6, CRFClassifier(("gap", "cos_attn"))
        clf.crf = random_crf(2, seed)
        x = torch.randn(L, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        rows = torch.zeros(L, len(FEATURES), dtype=torch.float64)
        rows[:, clf.cols] = x
        expected = None
        for l in range(L):  # the best of all 2^(l+1) label sequences of the prefix
            scores = all_scores(clf.crf, x[:l + 1])
            if max(scores, key=scores.get)[-1] == 1:
                expected = l
                break
        assert clf.stop_at(rows.tolist()) == expected
        stops.append(expected)
    assert None in stops and len(set(stops)) > 2  # the seeds stop at several layers and not at all


def test_training_raises_the_likelihood_and_json_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for _ in range(40):  # labels: 1 from the first layer whose feature 0 exceeds 0.5 on
        x = torch.rand(8, 2, generator=g, dtype=torch.float64)
        x[:, 0] = x[:, 0].cumsum(0) / 4
        first = int((x[:, 0] > 0.5).int().argmax()) if (x[:, 0] > 0.5).any() else 8
        xs.append(x)
        ys.append([int(l >= first) for l in range(8)])
    crf = CRF(2)
    before = crf.log_likelihood(xs, ys)
    crf.fit(xs, ys)
    assert crf.log_likelihood(xs, ys) > before + 50
    (tmp_path / "crf.json").write_text(json.dumps(crf.to_json()))
    again = CRF.from_json(json.loads((tmp_path / "crf.json").read_text()))
    assert all(torch.equal(getattr(again, k), getattr(crf, k)) for k in ("W", "b", "T"))
