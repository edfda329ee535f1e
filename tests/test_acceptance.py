"""The four acceptance metrics against their definitions: each peer's own bookkeeping replayed
token by token (the official Kangaroo loop's start_index, LayerSkip's match counters), and plain
decoding, which every per-pass metric puts at 1.00."""
import itertools

import pytest

from skip.acceptance import acceptance, committed
from skip.kangaroo import Round, generate_kangaroo

from conftest import random_adapter
from test_kangaroo import PROMPT, tiny


def official_accept_lengths(rounds, n_tokens):
    """The official evaluation/inference_kangaroo.py's list, replayed: [1] for the prefill, then
    start_index - start_index_copy per round, where start_index moves past the accepted drafts and
    M's token, and the run's last round stops at the output's end (its EOS)."""
    lengths, start = [1], 1  # tokens out so far
    for r in rounds:
        copy = start
        start = min(start + r.accepted + 1, n_tokens)
        lengths.append(start - copy)
    return lengths


def layerskip_rate(rounds):
    total_draft_matches = total_generations = 0
    for r in rounds:  # number_of_matches: the leading drafts that match; num_speculations: drafted
        total_draft_matches += r.accepted
        total_generations += r.drafted
    return total_draft_matches / total_generations


def conditional_by_events(rounds, i):
    """P(draft i accepted | proposed and drafts before it accepted), from per-draft events."""
    events = [(pos < r.accepted) for r in rounds for pos in range(r.drafted) if pos == i and r.accepted >= pos]
    return sum(events) / len(events) if events else None


def test_plain_decoding_is_one_token_per_pass():
    rounds = [Round(0, 0) for _ in range(7)]
    m = acceptance([(rounds, 8)])
    assert m["spec_bench"] == 1.0 and m["official_mean"] == 1.0 and m["official"] == [1] * 8
    assert m["layerskip"] is None and m["conditional"] == []


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_every_small_run_matches_each_peers_bookkeeping(cut):
    """All runs of two or three rounds with k <= 3 drafts, the last round cut by `cut` tokens."""
    shapes = [(k, a) for k in range(4) for a in range(k + 1)]
    n_runs = 0
    for n_rounds in (2, 3):
        for run in itertools.product(shapes, repeat=n_rounds):
            rounds = [Round(k, a, [0] * k) for k, a in run]
            n_tokens = 1 + sum(a + 1 for _, a in run) - min(cut, run[-1][1])
            m = acceptance([(rounds, n_tokens)])
            assert m["official"] == official_accept_lengths(rounds, n_tokens)
            assert sum(m["official"]) == n_tokens == 1 + sum(committed(rounds, n_tokens))
            assert m["spec_bench"] == pytest.approx((n_tokens - 1) / n_rounds)
            assert m["official_mean"] == pytest.approx(n_tokens / (n_rounds + 1))
            if any(k for k, _ in run):
                assert m["layerskip"] == pytest.approx(layerskip_rate(rounds))
            assert m["conditional"] == [pytest.approx(conditional_by_events(rounds, i)) if conditional_by_events(
                rounds, i) is not None else None for i in range(max(k for k, _ in run))]
            n_runs += 1
    assert n_runs == 10 ** 2 + 10 ** 3


def test_runs_pool_as_one_run_of_all_rounds():
    a, b = [Round(3, 1, [7, 8, 9]), Round(2, 2, [7, 8])], [Round(1, 0, [7])]
    pooled = acceptance([(a, 6), (b, 2)])
    assert pooled["official"] == [1, 2, 3, 1, 1]
    assert pooled["spec_bench"] == pytest.approx((5 + 1) / 3)
    assert pooled["layerskip"] == pytest.approx(3 / 6)


def test_a_real_run_counts_every_token_it_output(llama_dir):
    m = tiny(llama_dir, 0.0)
    out = generate_kangaroo(m, PROMPT, random_adapter(m, 2, 0, True), max_new_tokens=23, gamma=4, eta=0.0, eos=[])
    res = acceptance([(out.rounds, len(out.tokens))])
    assert sum(res["official"]) == len(out.tokens) == 23
    assert res["spec_bench"] * len(out.rounds) == pytest.approx(len(out.tokens) - 1)
    assert res["layerskip"] > 0  # drafts off identity deep layers are accepted: the rates are not vacuous


def test_rounds_that_cannot_be_are_refused_naming_the_run_and_round():
    good = [Round(2, 1, [7, 8])]
    assert acceptance(iter([(iter(good), 3)]))["spec_bench"] == 2.0  # one-pass iterators are read once
    for rounds, n, where in [([Round(1, 2, [7])], 4, "round 0"), ([Round(-1, 0, [])], 1, "round 0"),
                             ([Round(2, 1, [7])], 3, "round 0"), ([Round(True, 0, [7])], 2, "round 0"),
                             ([Round(2, 1, [7, 8])], 4, "4 tokens"), ([Round(2, 1, [7, 8])], 1, "1 tokens"),
                             ([], 2, "2 tokens"), ([Round(2, 1, [7, 8])], 2.5, "2.5 tokens")]:
        with pytest.raises(ValueError, match=where):
            acceptance([(good, 3), (rounds, n)])
