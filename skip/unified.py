"""Unified Layer Skipping (Liu et al., "Accelerating Inference in Large Language Models with a
Unified Layer Skipping Strategy", arXiv 2404.06954; official code github.com/Adaxry/Unified_Layer_Skipping).

Notation (the paper's method section):
    L   number of decoder layers
    r   target speedup ratio (an integer in the official code's --target_speedup)
    n   number of layers kept: n = int(L / r)
    K   the kept set: the first and last layer, and every `interval`-th layer in between
The method in the paper's words (abstract and method section): "selects the number of layers to
skip computation based solely on the target speedup ratio" (step 1: n from r), "and then skips
the corresponding number of intermediate layer computations in a balanced manner" (step 2: K
spread evenly, the bottom and top layers kept). The exact rule is the official code's
(codes/run_clm_llms.py: --target_speedup -> the reserved layers), which kept_layers reproduces;
train/modeling_bloom.py runs the prompt through all layers and generated tokens through K. K depends on r only, never on the
input (the paper's central point), so every token of every sequence runs the same layers:
batches stay batches and the KV cache stays valid, because a skipped layer is skipped for every
generated token and nobody ever reads its keys/values there (step 3: decoding). The prompt
runs through all layers and only generated tokens skip; fine-tuning with the same pattern, as
the paper does, is in skip/train/finetune.py.
"""
from __future__ import annotations

import math
import numbers

from model import generate


def kept_layers(L: int, r: float, real_valued: bool = False) -> list[int]:
    """The kept set K for L layers and target speedup r (the official code's rule).

    For L = 30: r = 2 keeps {0, 2, ..., 26, 29} (15 layers), r = 3 {0, 3, ..., 24, 29},
    r = 5 {0, 6, 12, 18, 24, 29}. The rule walks up from layer 0 in steps of
    interval = int(L / (n - 1)) and then appends the last layer, so the last gap is uneven:
    26 -> 29 at r = 2 (3 instead of 2), 24 -> 29 at r = 3 and r = 5.
    real_valued=True: kept_layers_even, ours (below).
    """
    check_ratio(L, r)
    if real_valued:
        return kept_layers_even(L, r)
    if r != int(r):
        raise ValueError(f"target speedup r={r} is not an integer; pass real_valued=True for the "
                         "evenly spaced extension (not in the paper)")
    n = int(L / r)  # step 1: the number of layers to keep follows from the target speedup alone
    if n < 2:
        raise ValueError(f"r={r} keeps n={n} layer of L={L}; the rule needs n >= 2 (first and last layer)")
    interval = int(L / (n - 1))  # step 2: the kept layers spread evenly, the first one kept
    K = [0]
    layer = interval
    while layer < L - 1 and len(K) < n - 1:
        K.append(layer)
        layer += interval
    return K + [L - 1]  # the last layer is always kept: it feeds the LM head


def check_ratio(L, r):
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 1 <= r < math.inf:
        raise ValueError(f"target speedup r={r!r} must be a finite number >= 1")
    if r > L:
        raise ValueError(f"target speedup r={r} is larger than the number of layers L={L}")


def generate_unified(model, prompts, r, real_valued=False, **kw):
    """Step 3: decode with the kept set K: the prompt through all layers, each new token through K.
    Batched with left padding, greedy or sampled (kw as for model.generate)."""
    K = kept_layers(model.cfg.n_layers, r, real_valued)
    return generate(model, prompts, decode_layers=lambda i: K, **kw)


# ================================================================ ours
def kept_layers_even(L: int, r: float) -> list[int]:
    """Any real r >= 1, not the paper's: n = round(L / r) layers at the rounded positions of an
    evenly spaced grid over [0, L - 1], so the gaps differ by at most one and the unevenness of
    the official rule's last gap is spread out."""
    check_ratio(L, r)
    n = max(2, round(L / r))
    return sorted({round(k * (L - 1) / (n - 1)) for k in range(n)})
