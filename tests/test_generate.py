"""Sampling, generation and beam search, checked against brute-force enumeration, greedy
decoding and transformers' beam search."""
import itertools

import pytest
import torch

from model import beam_search, filter_logits, generate
from model.generate import ban_repeated_ngrams

from conftest import hf_beam, same_as_hf


def brute_force_filter(logits, top_k, top_p):
    """Enumerate every token set; keep the smallest top-p prefix of the top-k tokens."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    keep = order[:top_k] if top_k else order
    probs = torch.softmax(logits[keep], -1).tolist()
    for n in range(1, len(keep) + 1):
        if sum(probs[:n]) >= top_p - 1e-7 or n == len(keep):
            return set(keep[:n])


@pytest.mark.parametrize("top_k,top_p", list(itertools.product([0, 1, 3, 12], [1.0, 0.9, 0.5, 0.05])))
def test_filter_logits_keeps_exactly_the_brute_force_set(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    logits = torch.randn(4, 12, generator=g) * 2
    kept = filter_logits(logits, top_k, top_p)
    for row in range(4):
        assert set(torch.isfinite(kept[row]).nonzero()[:, 0].tolist()) == brute_force_filter(logits[row], top_k, top_p)


@torch.no_grad()
def test_sampling_with_top_k_1_is_greedy_and_seeds_reproduce(pair):
    _, model = pair
    prompts = [[5, 6, 7], [9, 3]]
    greedy = generate(model, prompts, max_new_tokens=10, eos=[])
    assert generate(model, prompts, max_new_tokens=10, eos=[], temperature=0.7, top_k=1) == greedy
    run = lambda seed: generate(model, prompts, max_new_tokens=10, eos=[], temperature=1.0, top_p=0.9,  # noqa: E731
                                generator=torch.Generator().manual_seed(seed))
    assert run(0) == run(0)
    assert run(0) != run(1)


@torch.no_grad()
def test_generation_stops_at_eos_per_row(pair):
    _, model = pair
    prompts = [[5, 6, 7], [9, 3, 4, 4]]
    free = generate(model, prompts, max_new_tokens=12, eos=[])
    stop = free[0][3]  # pretend the 4th token of row 0 is EOS
    out = generate(model, prompts, max_new_tokens=12, eos=[stop])
    for b in range(2):
        cut = free[b].index(stop) + 1 if stop in free[b] else 12
        assert out[b] == free[b][:cut]


def test_bad_input_raises_clearly(pair):
    _, model = pair
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\)"):
        generate(model, [[1, 500]])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], temperature=1.0, top_p=0.0)


@torch.no_grad()
@pytest.mark.parametrize("num_beams, no_repeat", [(2, 3), (4, 0)])  # the full grid: on SmolLM2 (test_smollm2.py)
def test_beam_search_equals_transformers(pair, num_beams, no_repeat):
    hf, model = pair
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43]]
    greedy = generate(model, prompts, max_new_tokens=16, eos=[])
    eos = sorted({greedy[0][2], greedy[2][1]})  # tokens the likeliest continuations reach, so hypotheses end
    ended = False
    for lp, stop in [(1.0, False), (0.0, False), (2.0, "never"), (1.0, True)]:
        kw = dict(num_beams=num_beams, max_new_tokens=16, length_penalty=lp, no_repeat_ngram_size=no_repeat,
                  early_stopping=stop)
        ours = beam_search(model, prompts, eos=eos, **kw)
        assert same_as_hf(ours, *hf_beam(hf, prompts, eos, **kw)), (lp, stop)
        ended |= any(o[-1] in eos for o in ours)
    assert ended


def test_one_beam_is_greedy_and_no_repeat_bans_exactly_the_repeats(pair):
    _, model = pair
    prompts = [[5, 6, 7], [9, 3, 4, 4]]
    assert beam_search(model, prompts, num_beams=1, max_new_tokens=10, eos=[]) == \
        generate(model, prompts, max_new_tokens=10, eos=[])
    seqs = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 4, 4]])
    banned = torch.isinf(ban_repeated_ngrams(seqs, torch.zeros(2, 6), 3))
    assert banned.nonzero().tolist() == [[0, 3], [1, 4]]  # "1 2" was followed by 3; "4 4" by 4
    assert torch.isinf(ban_repeated_ngrams(seqs, torch.zeros(2, 6), 1)).sum(1).tolist() == [3, 1]
    with pytest.raises(ValueError, match="num_beams >= 1"):
        beam_search(model, prompts, num_beams=0)
