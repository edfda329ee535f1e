"""How much of a draft the full model accepted, as each peer reports it, from one run's rounds.

Self-speculative papers and tools print differently defined numbers under similar names; a port
compared against any of them should read the same number here. Per round r (one verification
pass): k_r drafts proposed, a_r of them accepted, c_r tokens committed (a_r + 1, the last round
cut at EOS or the token budget). The prefill's first token is no round.
    spec_bench       sum(c_r) / rounds: mean accepted tokens per verification pass, the bonus
                     token included (Spec-Bench's "#Mean accepted tokens"; plain decoding = 1.00)
    conditional[i]   #(a_r >= i+1) / #(k_r >= i+1 and a_r >= i): P(draft i+1 accepted | it was
                     proposed and every draft before it was accepted)
    layerskip        sum(a_r) / sum(k_r): accepted drafts per drafted token (LayerSkip's
                     self_speculation "acceptance_rate")
    official         [1] + [c_r ...]: the official Kangaroo evaluation's accept_length_list (its
                     first entry is the prefill's token); official_mean is its mean, the number its
                     speed.py prints as "#Mean accepted tokens"
A run without rounds has no rates (None); its official list is [1]. Rounds that cannot be are
refused (ValueError naming the run and round): counts that are not integers >= 0, accepted >
drafted, a drafts list not of drafted tokens, or an output length the rounds cannot give.
"""
from __future__ import annotations

from model.config import is_int


def committed(rounds, n_tokens):
    """c_r per round: a_r + 1, except the last round's tokens cut at EOS or the budget. n_tokens:
    the run's output length (the prefill's token + sum c_r)."""
    c = [r.accepted + 1 for r in rounds]
    if c:
        c[-1] = n_tokens - 1 - sum(c[:-1])
    return c


def _count(v):
    return is_int(v) and v >= 0


def check_run(i, rounds, n_tokens):
    """Refuse run i's rounds and output length where no decoding gives them."""
    for j, r in enumerate(rounds):
        if not (_count(r.drafted) and _count(r.accepted) and r.accepted <= r.drafted
                and len(r.drafts) == r.drafted):
            raise ValueError(f"run {i}, round {j}: drafted {r.drafted!r}, accepted {r.accepted!r} and "
                             f"{len(r.drafts)} drafts cannot be (need 0 <= accepted <= drafted = len(drafts))")
    most = 1 + sum(r.accepted + 1 for r in rounds)  # the prefill's token and every round's a + 1
    least = most - rounds[-1].accepted if rounds else 1  # the last round cut at EOS or the budget
    if not (_count(n_tokens) and least <= n_tokens <= most):
        raise ValueError(f"run {i}: {n_tokens!r} tokens cannot come of its {len(rounds)} rounds "
                         f"(between {least} and {most})")


def acceptance(runs):
    """The four metrics over runs: (rounds, n_tokens) pairs, e.g. one per batch row, pooled."""
    runs = [(list(rs), n) for rs, n in runs]  # an iterator is read once
    for i, (rs, n) in enumerate(runs):
        check_run(i, rs, n)
    rounds = [r for rs, _ in runs for r in rs]
    c = [x for rs, n in runs for x in committed(rs, n)]
    official = [x for rs, n in runs for x in [1] + committed(rs, n)]
    depth = max((r.drafted for r in rounds), default=0)
    reached = [sum(r.drafted > i and r.accepted >= i for r in rounds) for i in range(depth)]
    return {
        "spec_bench": sum(c) / len(c) if c else None,
        "conditional": [sum(r.accepted > i for r in rounds) / n if n else None for i, n in enumerate(reached)],
        "layerskip": sum(r.accepted for r in rounds) / d if (d := sum(r.drafted for r in rounds)) else None,
        "official": official,
        "official_mean": sum(official) / len(official) if runs else None,
    }
