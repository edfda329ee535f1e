"""A linear-chain CRF over the sequence of layers, from scratch: AdaInfer's second classifier
(the paper's "Classifier": SVM and CRF; skip/adainfer.py).

Notation: a sequence x_0..x_{L-1} of per-layer feature vectors (F,), labels y_l in {0, 1}
(1 = "stopping here is right"). Emission score e_l(y) = W[y] . x_l + b[y], transition score
T[y', y]. score(x, y) = sum_l e_l(y_l) + sum_{l>0} T[y_{l-1}, y_l];
p(y | x) = exp(score(x, y)) / Z(x), log Z computed by the forward algorithm in log space.
Training maximises the log-likelihood (minus an L2 penalty) with L-BFGS; decoding is Viterbi.
Early exit needs a decision at layer l from layers 0..l only: step() advances the Viterbi
recursion by one layer and says "stop" when the best path over the prefix ends in label 1.
Parameters go to and from JSON with to_json/from_json (no pickle).
"""
from __future__ import annotations

import torch


class CRF:
    def __init__(self, n_features: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = 0.01 * torch.randn(2, n_features, generator=g, dtype=torch.float64)  # emissions
        self.b = torch.zeros(2, dtype=torch.float64)
        self.T = torch.zeros(2, 2, dtype=torch.float64)  # T[y_prev, y]

    def emissions(self, x):  # (L, F) -> (L, 2)
        return torch.as_tensor(x, dtype=torch.float64) @ self.W.T + self.b

    def score(self, x, y):
        e = self.emissions(x)
        y = torch.as_tensor(y)
        return e[torch.arange(len(y)), y].sum() + self.T[y[:-1], y[1:]].sum()

    def log_partition(self, x):
        """Forward algorithm: alpha_l(y) = e_l(y) + logsumexp_y' (alpha_{l-1}(y') + T[y', y])."""
        e = self.emissions(x)
        alpha = e[0]
        for l in range(1, len(e)):
            alpha = e[l] + torch.logsumexp(alpha[:, None] + self.T, dim=0)
        return torch.logsumexp(alpha, dim=0)

    def viterbi(self, x):
        """The most likely label sequence: delta_l(y) = e_l(y) + max_y' (delta_{l-1}(y') + T[y', y])."""
        e = self.emissions(x)
        delta, back = e[0], []
        for l in range(1, len(e)):
            cand = delta[:, None] + self.T  # (y', y)
            back.append(cand.argmax(0))
            delta = e[l] + cand.max(0).values
        path = [int(delta.argmax())]
        for bp in reversed(back):
            path.append(int(bp[path[-1]]))
        return path[::-1], float(delta.max())

    def step(self, delta, x):
        """The online decision at one layer: delta (2,) of the layers before (None at layer 0)
        advanced by x (F,), and stop = the best label path over the prefix ends in 1."""
        e = self.emissions(torch.as_tensor(x)[None])[0]
        delta = e if delta is None else e + (delta[:, None] + self.T).max(0).values
        return delta, bool(delta[1] > delta[0])

    def fit(self, xs, ys, l2=1e-2, iters=100):
        """Maximise sum log p(y | x) - l2 * |params|^2 over sequences xs (L, F) and labels ys (L,)."""
        params = [self.W.requires_grad_(), self.b.requires_grad_(), self.T.requires_grad_()]
        opt = torch.optim.LBFGS(params, max_iter=iters, line_search_fn="strong_wolfe")
        xs = [torch.as_tensor(x, dtype=torch.float64) for x in xs]

        def closure():
            opt.zero_grad()
            nll = sum(self.log_partition(x) - self.score(x, y) for x, y in zip(xs, ys)) / len(xs)
            loss = nll + l2 * sum((p ** 2).sum() for p in params)
            loss.backward()
            return loss

        opt.step(closure)
        for p in params:
            p.requires_grad_(False)
        return self

    def log_likelihood(self, xs, ys):
        with torch.no_grad():
            return float(sum(self.score(x, y) - self.log_partition(x) for x, y in zip(xs, ys)))

    def to_json(self):
        return {"kind": "crf", "W": self.W.tolist(), "b": self.b.tolist(), "T": self.T.tolist()}

    @classmethod
    def from_json(cls, d):
        crf = cls(len(d["W"][0]))
        crf.W, crf.b, crf.T = (torch.tensor(d[k], dtype=torch.float64) for k in ("W", "b", "T"))
        return crf
