"""Batched Kangaroo against its oracles: each row's unbatched run (tokens, and round for round its
drafts and acceptance), plain greedy decoding, the exact target distribution (chi-square at
B >= 2), and the caches' own record of each row's real slots."""
import pytest
import torch

from model import KVCache, generate, left_pad, load_model, positions
from skip.kangaroo import generate_kangaroo
from skip.kangaroo_batch import generate_kangaroo_batch
from skip.kangaroo_files import load_adapter
from tokenizer import encode_chat

from skip import WEIGHTS

from conftest import chi_square_pvalue, random_adapter
from test_kangaroo import second_token_marginal, tiny  # tiny: the tiny Llama with its deep layers scaled

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18], [20], [30, 31, 32, 33, 34]]  # four lengths


def rounds(out):
    return [(r.drafts, r.accepted) for r in out.rounds]


def same_as_alone(m, prompts, batch_size=None, **kw):
    """The batched run (batch_size: through a queue), after checking each row against that prompt
    decoded alone."""
    batch = generate_kangaroo_batch(m, prompts, batch_size=batch_size, **kw)
    assert len(batch) == len(prompts)
    for p, row in zip(prompts, batch):
        alone = generate_kangaroo(m, p, **kw)
        assert row.tokens == alone.tokens and rounds(row) == rounds(alone), (p, batch_size, kw)
    return batch


@pytest.mark.parametrize("deep_scale", [0.0, 0.3, 1.0])
def test_each_row_is_its_prompt_decoded_alone_and_plain_greedy(llama_dir, deep_scale):
    m = tiny(llama_dir, deep_scale)
    plain = [generate(m, [p], max_new_tokens=20, eos=[])[0] for p in PROMPTS]
    seen = {"accepted": 0, "idle": 0, "holes": 0, "short": 0}
    for seed, (gamma, eta) in enumerate([(0, 0.6), (1, 0.0), (3, 1.0), (6, 0.3)]):  # every gamma, four etas
        for a, kw in [(random_adapter(m, 2, seed, lens_like=seed % 2 == 0), {}), (None, {"l": 2}),
                      (random_adapter(m, 2, seed, lens_like=True), {"draft_vocab": 20})]:
            batch = same_as_alone(m, PROMPTS, adapter=a, max_new_tokens=20, gamma=gamma, eta=eta, eos=[], **kw)
            assert [o.tokens for o in batch] == plain
            for o in batch:
                seen["accepted"] += sum(r.accepted for r in o.rounds)
                seen["idle"] += sum(r.idle for r in o.rounds)
                seen["holes"] += sum(r.holes for r in o.rounds)
                seen["short"] += sum(r.drafted < gamma for r in o.rounds)
    if deep_scale == 0.0:  # rows accepted drafts, and by different amounts: holes and idle positions
        assert all(seen.values()), seen


def test_rows_end_at_eos_and_at_their_budget_in_different_rounds(llama_dir):
    m = tiny(llama_dir, 0.0)
    a = random_adapter(m, 2, 0, lens_like=True)
    plain = [generate(m, [p], max_new_tokens=30, eos=[])[0] for p in PROMPTS]
    for stop in [plain[1][7], plain[0][0], plain[3][12]]:  # a token mid-way, one that ends a row at once
        ref = [generate(m, [p], max_new_tokens=30, eos=[stop])[0] for p in PROMPTS]
        for gamma, eta in [(1, 0.0), (4, 0.0), (6, 0.6)]:
            batch = same_as_alone(m, PROMPTS, adapter=a, max_new_tokens=30, gamma=gamma, eta=eta, eos=[stop])
            assert [o.tokens for o in batch] == ref
        assert len({len(o.rounds) for o in batch}) > 1  # rows left the batch in different rounds
    for n in [1, 2, 3, 7]:  # budgets of no round, of a round with nothing to draft, ...
        batch = same_as_alone(m, PROMPTS, adapter=a, max_new_tokens=n, gamma=6, eta=0.0, eos=[])
        assert [o.tokens for o in batch] == [p[:n] for p in plain]
    assert generate_kangaroo_batch(m, [PROMPTS[0]], adapter=a, max_new_tokens=5)[0].tokens == \
        generate_kangaroo(m, PROMPTS[0], adapter=a, max_new_tokens=5).tokens  # a list of one prompt


def test_a_row_does_not_depend_on_the_rows_beside_it(llama_dir):
    m = tiny(llama_dir, 0.3)
    a = random_adapter(m, 2, 1, lens_like=True)
    kw = dict(adapter=a, max_new_tokens=24, gamma=4, eta=0.3, eos=[plain_stop(m)])
    whole = {tuple(p): o for p, o in zip(PROMPTS, generate_kangaroo_batch(m, PROMPTS, **kw))}
    for group in [PROMPTS[::-1], PROMPTS[1:3], [PROMPTS[2], PROMPTS[0], PROMPTS[2]], [PROMPTS[3]] * 3]:
        for p, o in zip(group, generate_kangaroo_batch(m, group, **kw)):
            assert o.tokens == whole[tuple(p)].tokens and rounds(o) == rounds(whole[tuple(p)])


def plain_stop(m):
    return generate(m, [PROMPTS[1]], max_new_tokens=10, eos=[])[0][6]


@torch.no_grad()
def test_a_row_with_padding_and_holes_sees_what_it_would_see_alone(llama_dir):
    """The cache's representation (model/cache.py): shared slots, a valid mask, positions counted
    from it. Row 0 keeps one of three new slots (two holes), row 1 all three; each row's next
    logits equal the whole sequence run alone without any cache."""
    m = load_model(llama_dir)
    p, new = [PROMPTS[0], PROMPTS[3]], [[40, 41, 42], [50, 51, 52]]
    cache = KVCache.for_model(m.cfg, 2, 16)
    m(left_pad(p, 0)[0], cache=cache, pad_mask=cache.open(5, [[False, False, True, True, True], [True] * 5]))
    m(torch.tensor(new), cache=cache, start=5, pad_mask=cache.open(3))
    cache.crop(8)
    cache.hide(5, [1, 3])
    nxt = torch.tensor([[60], [61]])
    z = m(nxt, cache=cache, start=8, pad_mask=cache.open(1))[:, -1]  # (2, V)
    for b, seq in enumerate([p[0] + new[0][:1] + [60], p[1] + new[1] + [61]]):
        assert torch.allclose(z[b], m(torch.tensor([seq]))[0, -1], atol=1e-5)
    assert cache.pad_mask(9).sum(-1).tolist() == [len(p[0]) + 2, len(p[1]) + 4]


def real_slots(cache):
    """Each row's real slots (no mask: every opened slot of every row is real)."""
    mask = cache.pad_mask(cache.opened)
    return [cache.opened] * cache.k.shape[1] if mask is None else mask.sum(-1).tolist()


def test_caches_hold_each_rows_tokens_and_the_waste_counts_them(llama_dir):
    """After each round, row b's real slots in M's cache are its prompt and committed tokens but the
    newest, A's the same or one fewer (A has not read the last draft when all were accepted); the
    next round's `holes` are the rest of the slots, its `idle` the batch's longest draft minus its own."""
    m = tiny(llama_dir, 0.0)
    a = random_adapter(m, 2, 0, lens_like=True)
    seen = []

    def on_round(tokens, caches, row):
        cache, acache = caches
        assert len(set(cache.lengths)) == 1 and cache.opened == cache.lengths[0]
        seen.append((row, len(tokens), cache.opened, real_slots(cache), real_slots(acache)))

    outs = generate_kangaroo_batch(m, PROMPTS, a, max_new_tokens=30, gamma=4, eta=0.3, eos=[plain_stop(m)],
                             on_round=on_round)
    j = [0] * len(PROMPTS)
    for row, n_tokens, slots, real, areal in seen:
        active = [b for b, o in enumerate(outs) if len(o.rounds) > j[row]]  # the batch rows of this round
        b = active.index(row)
        r = outs[row].rounds[j[row]]
        assert r.idle == max(outs[x].rounds[j[row]].drafted for x in active) - r.drafted
        j[row] += 1
        if j[row] == len(outs[row].rounds):
            continue  # the row's last round: it may have kept tokens after its EOS, and leaves
        cached = len(PROMPTS[row]) + n_tokens - 1
        assert real[b] == cached and areal[b] == cached - (r.accepted == r.drafted)
        assert outs[row].rounds[j[row]].holes == slots - cached
    assert j == [len(o.rounds) for o in outs] and sum(r.holes for o in outs for r in o.rounds) > 0


def test_observe_tells_each_row_what_it_would_see_alone(llama_dir):
    m = tiny(llama_dir, 0.3)
    a = random_adapter(m, 2, 2, lens_like=True)
    kw = dict(max_new_tokens=16, gamma=3, eta=0.3, eos=[], draft_vocab=20)
    batched = {b: [] for b in range(len(PROMPTS))}
    generate_kangaroo_batch(m, PROMPTS, a, observe=lambda *seen, row: batched[row].append(seen), **kw)
    for b, p in enumerate(PROMPTS):
        alone = []
        generate_kangaroo(m, p, a, observe=lambda *seen: alone.append(seen), **kw)
        assert [s[0] for s in batched[b]] == [s[0] for s in alone]
        for (_, h, z, ids), (_, h1, z1, ids1) in zip(batched[b], alone):
            assert h.shape == h1.shape and z.shape == z1.shape and (ids is None) == (ids1 is None)
            assert ids is None or torch.equal(ids, ids1)
            assert torch.allclose(h, h1, atol=1e-5) and torch.allclose(z, z1, atol=1e-4)


def test_batched_sampling_keeps_every_rows_target_distribution(llama_dir):
    """As test_kangaroo.py at batch 1: each row's second token comes out of a draft round, and its
    marginal must be sum_x1 p(x1) p(x2 | x1) of plain sampling, computed exactly, prompt by prompt."""
    m = tiny(llama_dir, 0.3)
    a = random_adapter(m, 2, 0, lens_like=True)
    t, top_p, prompts = 1.5, 0.9, [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # a row twice: its draws independent
    g, N = torch.Generator().manual_seed(0), 1000  # N: chi_square_pvalue's power
    counts = torch.zeros(len(prompts), m.cfg.vocab_size)
    # One batch of N copies of the three rows: N draws of each row, at a batch of 3N rows.
    outs = generate_kangaroo_batch(m, prompts * N, a, max_new_tokens=3, gamma=2, eta=0.0, temperature=t, top_p=top_p,
                                   generator=g, eos=[])
    for i, o in enumerate(outs):
        counts[i % len(prompts), o.tokens[1]] += 1
    assert not torch.equal(counts[0], counts[2])
    for b, p in enumerate(prompts):
        exact = second_token_marginal(m, p, t, top_p)
        assert counts[b, exact == 0].sum() == 0
        assert chi_square_pvalue(counts[b], exact, N) > 0.01, b


def test_bad_batches_are_refused(llama_dir):
    m = load_model(llama_dir)
    with pytest.raises(ValueError, match="token ids"):
        generate_kangaroo_batch(m, [[5, 6], []], None, l=2)
    with pytest.raises(ValueError, match="token ids"):
        generate_kangaroo_batch(m, [[5, 6], [m.cfg.vocab_size]], None, l=2)
    with pytest.raises(ValueError, match="token ids"):
        generate_kangaroo_batch(m, [], None, l=2)


SMOL_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
                "Explain in two sentences why the sky is blue, for a child.", "Hi"]


def test_smollm2_batch_of_four_rows_equals_each_row_alone(smollm2):
    m, tok = smollm2
    a = load_adapter(WEIGHTS / "kangaroo-l2", m)
    ids = [encode_chat(tok, text) for text in SMOL_PROMPTS]
    assert len({len(p) for p in ids}) == 4
    batch = same_as_alone(m, ids, adapter=a, max_new_tokens=12, gamma=6, eta=0.6)
    assert [o.tokens for o in batch] == [generate(m, [p], max_new_tokens=12)[0] for p in ids]


def test_a_large_batch_sizes_its_caches_by_what_its_rows_can_hold(llama_dir):
    """Slots grow with the rounds a batch can run (at most max_new_tokens - 1, each moving n by
    at most gamma + 1), not with B times the tokens: 64 short prompts keep short caches."""
    m = tiny(llama_dir, 0.0)
    a = random_adapter(m, 2, 0, lens_like=True)
    prompts = [[5 + i % 50, 6] for i in range(64)]
    seen = []
    outs = generate_kangaroo_batch(m, prompts, a, max_new_tokens=3, gamma=6, eta=0.0, eos=[],
                                   on_round=lambda tokens, caches, row: seen.append(caches))
    assert [o.tokens for o in outs] == [generate(m, [p], max_new_tokens=3, eos=[])[0] for p in prompts]
    cache, acache = seen[0]
    bound = 2 + 2 * 7 + 3 + 1  # T + (N - 1)(gamma + 1) + min(gamma, N) + 1
    assert cache.max_len == bound and acache.max_len == bound + 3 and cache.k.shape[3] <= bound


# ---------------------------------------------------------------- draft-length policies
@torch.no_grad()
def policy_rounds(m, prompts, l, N, gamma, eta, policy):
    """A batch's tokens and rounds under a draft-length policy (skip/kangaroo_batch.py), restated
    with every pass recomputed without caches: adapter-free drafts (layers [0, l), then M's own
    norm and head), M's verification, greedy acceptance; every row runs to N tokens."""
    def draft(seq):
        ids, pos = torch.tensor([seq]), positions(None, 0, len(seq))
        p = m.logits(m.run_layers(m.embed_tokens(ids, pos), pos, layers=range(l)), last_only=True)[0, -1].softmax(-1)
        return int(p.argmax()), float(p.max())
    tokens = [[int(m(torch.tensor([p]))[0, -1].argmax())] for p in prompts]
    rounds, active = [[] for _ in prompts], list(range(len(prompts)))
    while active := [b for b in active if len(tokens[b]) < N]:
        ks = {b: min(gamma, N - len(tokens[b]) - 1) for b in active}
        if policy == "batch_k":
            ks = dict.fromkeys(active, min(ks.values()))
        drafts, conf, going, i = {b: [] for b in active}, dict.fromkeys(active, 1.0), set(active), 0
        while going:  # going: the rows whose token at step i is real; then those that draft from it
            every = all(conf[c] >= eta for c in going)  # batch_stop: no row's draft at step i - 1 below eta
            sure = {b: every if policy == "batch_stop" else conf[b] >= eta for b in going}
            going = {b for b in going if i < ks[b] and sure[b]}
            for b in going:
                t, conf[b] = draft(prompts[b] + tokens[b] + drafts[b])
                drafts[b].append(t)
            i += 1
        for b in active:
            seq, d = prompts[b] + tokens[b], drafts[b]
            target = m(torch.tensor([seq + d]))[0, len(seq) - 1:].argmax(-1).tolist()
            a = next(j for j in range(len(d) + 1) if j == len(d) or d[j] != target[j])
            rounds[b].append((len(d), a, d))
            tokens[b] += (d[:a] + [target[a]])[:N - len(tokens[b])]
    return tokens, rounds


@pytest.mark.parametrize("policy, eta", [("row", 0.3), ("batch_k", 0.0), ("batch_stop", 0.3)])
def test_each_draft_length_policy_is_exact_and_drafts_as_it_says(llama_dir, policy, eta):
    m = tiny(llama_dir, 0.3)  # rows accept different numbers of drafts
    N, gamma = 14, 3
    outs = generate_kangaroo_batch(m, PROMPTS, None, l=2, max_new_tokens=N, gamma=gamma, eta=eta, eos=[],
                                   policy=policy)
    tokens, want = policy_rounds(m, PROMPTS, 2, N, gamma, eta, policy)
    assert [o.tokens for o in outs] == tokens == [generate(m, [p], max_new_tokens=N, eos=[])[0] for p in PROMPTS]
    assert [[(r.drafted, r.accepted, r.drafts) for r in o.rounds] for o in outs] == want
    assert sum(a for row in want for _, a, _ in row) > 0
    alone = [[(r.drafted, r.accepted, r.drafts) for r in generate_kangaroo(m, p, None, l=2, max_new_tokens=N,
                                                                            gamma=gamma, eta=eta, eos=[]).rounds]
             for p in PROMPTS]
    assert (want == alone) == (policy == "row")  # only ours leaves every row as it runs alone


def test_a_policy_is_refused_where_it_means_nothing(llama_dir):
    m = load_model(llama_dir)
    with pytest.raises(ValueError, match="policy must be one of row, batch_k, batch_stop"):
        generate_kangaroo_batch(m, PROMPTS, None, l=2, policy="batch")
    with pytest.raises(ValueError, match="without eta: give eta 0"):
        generate_kangaroo_batch(m, PROMPTS, None, l=2, eta=0.6, policy="batch_k")
