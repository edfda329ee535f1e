"""The CRF against brute-force enumeration of every label sequence."""
import itertools

import torch

from skip.crf import CRF


def random_crf(F, seed):
    crf = CRF(F, seed)
    g = torch.Generator().manual_seed(seed + 100)
    crf.W = torch.randn(2, F, generator=g, dtype=torch.float64)
    crf.b = torch.randn(2, generator=g, dtype=torch.float64)
    crf.T = torch.randn(2, 2, generator=g, dtype=torch.float64)
    return crf


def test_viterbi_and_log_partition_equal_brute_force():
    for seed in range(20):
        L, F = 1 + seed % 7, 3
        crf = random_crf(F, seed)
        x = torch.randn(L, F, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        scores = {y: float(crf.score(x, list(y))) for y in itertools.product([0, 1], repeat=L)}
        best = max(scores, key=scores.get)
        path, value = crf.viterbi(x)
        assert tuple(path) == best and abs(value - scores[best]) < 1e-9
        assert abs(float(crf.log_partition(x)) - float(torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), 0))) < 1e-9


def test_online_stop_is_the_first_prefix_whose_best_path_ends_in_stop():
    for seed in range(20):
        L, crf = 6, random_crf(2, seed)
        x = torch.randn(L, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        expected = next((l for l in range(L) if crf.viterbi(x[:l + 1])[0][-1] == 1), None)
        assert crf.stop_at(iter(x)) == expected


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
    crf.save(tmp_path / "crf.json")
    import json
    again = CRF.from_json(json.loads((tmp_path / "crf.json").read_text()))
    assert [again.stop_at(iter(x)) for x in xs] == [crf.stop_at(iter(x)) for x in xs]
