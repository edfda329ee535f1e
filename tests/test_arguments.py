"""Every public function that decodes refuses the same bad arguments at its boundary, with a
TypeError or ValueError naming what is wrong (model.check_prompts, check_eos, check_sampling,
check_length; the exits' check_vocab), before anything runs: no sibling accepts what another
refuses, and nothing reaches the embedding as an IndexError."""
import pytest
import torch

from model import beam_search, generate, load_model
from skip.adainfer import Threshold, predict, trace
from skip.adainfer_gen import generate_adainfer
from skip.baselines import generate_early_exit, generate_skipdecode
from skip.kangaroo import generate_kangaroo
from skip.kangaroo_batch import generate_kangaroo_batch
from skip.unified import generate_unified

from conftest import random_adapter

P = [5, 6, 7]


@pytest.fixture(scope="module")
def m(llama_dir):
    return load_model(llama_dir)


def decoders(m):
    """name -> call(prompts, **kw) on a list of prompts; kw: max_new_tokens, eos, sampling."""
    a = random_adapter(m, 2, 0, lens_like=True)
    return {
        "generate": lambda ps, **kw: generate(m, ps, **kw),
        "beam_search": lambda ps, **kw: beam_search(m, ps, **{k: v for k, v in kw.items() if k not in SAMPLING}),
        "unified": lambda ps, **kw: generate_unified(m, ps, 2, **kw),
        "skipdecode": lambda ps, **kw: generate_skipdecode(m, ps, 2, **kw),
        "early exit": lambda ps, **kw: generate_early_exit(m, ps, 0.9, **kw),
        "adainfer generation": lambda ps, **kw: generate_adainfer(
            m, ps, Threshold(0.8), **{k: v for k, v in kw.items() if k not in SAMPLING}),
        "kangaroo": lambda ps, **kw: [generate_kangaroo(m, p, a, **kw) for p in ps],
        "kangaroo batch": lambda ps, **kw: generate_kangaroo_batch(m, ps, a, **kw),
    }


SAMPLING = ("temperature", "top_p")
BAD = [  # (prompts, kw, exception, words in its message)
    ("not a list", {}, TypeError, "must be a list"),
    ([[5, 6.0]], {}, TypeError, "not an integer token id"),
    ([[5, True]], {}, TypeError, "not an integer token id"),
    ([[[5, 6]]], {}, TypeError, "not an integer token id"),
    ([P, []], {}, ValueError, "holds no token ids"),
    ([P, [10 ** 6]], {}, ValueError, "outside the vocabulary"),
    ([P], {"max_new_tokens": True}, ValueError, "max_new_tokens"),
    ([P], {"max_new_tokens": 2.0}, ValueError, "max_new_tokens"),
    ([P], {"eos": 2}, TypeError, "eos must be a list"),
    ([P], {"eos": "2"}, TypeError, "eos must be a list"),
    ([P], {"eos": [10 ** 6]}, ValueError, "eos must hold token ids"),
]
SAMPLED = [([P], {"top_p": 0.0}, ValueError, "top_p"), ([P], {"temperature": float("nan")}, ValueError, "temperature")]


def test_every_decoder_refuses_the_same_bad_arguments_naming_them(m):
    calls = decoders(m)
    for name, call in calls.items():
        cases = BAD + ([] if name in ("beam_search", "adainfer generation") else SAMPLED)
        if name == "kangaroo":  # one prompt at a time (a nested one is told to use the batch function)
            cases = [c for c in cases if c[0] != "not a list" and c[0] != [[[5, 6]]]]
        for prompts, kw, exc, words in cases:
            with pytest.raises(exc, match=words):
                call(prompts, **{"max_new_tokens": 3, **kw})
        assert call([P], max_new_tokens=3)  # and the good call runs


def test_the_exits_refuse_settings_that_would_never_stop_or_index_outside(m):
    tensor = torch.tensor([P])
    for call, exc, words in [
        (lambda: generate_early_exit(m, P, float("nan")), ValueError, "tau must be a finite number"),
        (lambda: generate_early_exit(m, P, 0.9, vocab=torch.tensor([0, 10 ** 6])), ValueError, "vocab must hold"),
        (lambda: generate_early_exit(m, P, 0.9, vocab=torch.tensor([1.5])), ValueError, "vocab must be"),
        (lambda: generate_early_exit(m, [P, P], 0.9, forced=[[5, 6]]), ValueError, "forced gives 1 rows for 2"),
        (lambda: generate_early_exit(m, [P, P], 0.9, forced=[[5, 6], []]), ValueError, "forced row 1 holds no"),
        (lambda: generate_early_exit(m, tensor, 0.9), TypeError, "must be a list of token-id lists"),
        (lambda: Threshold(float("nan")), ValueError, "tau must be a finite number"),
        (lambda: generate_adainfer(m, P, Threshold(0.8), check_every=0), ValueError, "check_every"),
        (lambda: generate_adainfer(m, P, Threshold(0.8), check_every=1.5), ValueError, "check_every"),
        (lambda: generate_adainfer(m, P, Threshold(0.8), check_every=-1), ValueError, "check_every"),
        (lambda: predict(m, P, Threshold(0.8), vocab=torch.tensor([-1, 3])), ValueError, "vocab must hold"),
        (lambda: predict(m, [P, "abc"], Threshold(0.8)), TypeError, "prompt 1 must be a list"),
        (lambda: trace(m, tensor, 3), TypeError, "must be a list of token-id lists"),
    ]:
        with pytest.raises(exc, match=words):
            call()
