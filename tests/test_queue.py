"""A queue of prompts through B rows (model/queue.py, ours) against its oracles: a seated row's
logits against its whole sequence run without a cache; every prompt's tokens (and Kangaroo's
drafts and accepted counts; the exits' layers and AdaInfer's records) against its run alone,
whatever joins or leaves around it and whenever; sampled Kangaroo rows that join a running batch
against the exact distribution."""
import pytest
import torch

from model import CacheError, KVCache, generate, generate_queue, left_pad, load_model
from skip.adainfer import SVM
from skip.adainfer_gen import generate_adainfer
from skip.baselines import generate_early_exit
from skip.kangaroo_batch import generate_kangaroo_batch

from conftest import chi_square_pvalue, random_adapter
from test_exits_batch import PROMPTS as EXIT_PROMPTS, N, ending_tokens, lens_quantile
from test_kangaroo import second_token_marginal, tiny
from test_kangaroo_batch import same_as_alone

SHORT = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18], [20], [30, 31, 32, 33, 34]]
LONG = [t % 97 for t in range(40, 160)]  # longer than every running row's slots: the batch shifts right to seat it


@torch.no_grad()
def test_a_seated_row_sees_its_own_sequence_alone(llama_dir):
    """Two rows run, row 0 with padding and two holes; a prompt longer than every slot so far,
    prefilled alone, takes row 1 (the batch shifts right), then a short one (trim drops the
    padding every row has); each time each row's next logits equal its whole sequence run
    without any cache; a prompt that fills every slot leaves no mask."""
    m = load_model(llama_dir)
    p = [SHORT[0], SHORT[3]]
    cache = KVCache.for_model(m.cfg, 2, 128)
    m(left_pad(p, 0)[0], cache=cache, pad_mask=cache.open(5, [[False, False, True, True, True], [True] * 5]))
    m(torch.tensor([[40, 41, 42], [50, 51, 52]]), cache=cache, start=5, pad_mask=cache.open(3))
    cache.crop(8)
    cache.hide(5, [1, 3])
    seqs = [p[0] + [40], LONG[:12]]  # row 0 keeps its padding and two holes through the shift
    solo = KVCache.for_model(m.cfg, 1, 12)
    m(torch.tensor([seqs[1]]), cache=solo, pad_mask=solo.open(12))
    cache.seat(1, solo)
    assert cache.lengths[0] == 12 and cache.trim() == 0  # shifted right by 4, row 1 real from slot 0
    nxt = torch.tensor([[60], [61]])
    z = m(nxt, cache=cache, start=12, pad_mask=cache.open(1))[:, -1]  # (2, V)
    for b, seq in enumerate(seqs):
        assert torch.allclose(z[b], m(torch.tensor([seq + [60 + b]]))[0, -1], atol=1e-5)
    solo = KVCache.for_model(m.cfg, 1, 2)
    m(torch.tensor([[7, 8]]), cache=solo, pad_mask=solo.open(2))
    cache.seat(1, solo)  # row 1's slots become padding: slots 0..5 are padding in every row
    assert cache.trim() == 6 and cache.lengths[0] == 7
    z = m(nxt, cache=cache, start=7, pad_mask=cache.open(1))[:, -1]
    for b, seq in enumerate([seqs[0] + [60], [7, 8]]):
        assert torch.allclose(z[b], m(torch.tensor([seq + [60 + b]]))[0, -1], atol=1e-5)
    for b in (0, 1):  # two prompts that each fill every slot
        solo = KVCache.for_model(m.cfg, 1, 8)
        m(torch.tensor([[9 + b] * 8]), cache=solo, pad_mask=solo.open(8))
        cache.seat(b, solo)
    assert cache.trim() == 0 and cache.valid is None  # every slot real again: no mask, as one unpadded batch
    with pytest.raises(CacheError, match="real token"):
        cache.shift(-1)
    m(nxt, cache=cache, start=8, pad_mask=cache.open(1), layers=[0])  # layer 0 runs ahead of the others
    with pytest.raises(CacheError, match="last open slot"):
        cache.seat(1, solo)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_plain_queue_rows_are_their_runs_alone(llama_dir, batch_size):
    m = load_model(llama_dir)
    prompts = [SHORT[0], SHORT[1], LONG, SHORT[2], SHORT[3], SHORT[0]]
    plain = [generate(m, [p], max_new_tokens=12, eos=[])[0] for p in prompts]
    for stop in [plain[0][3], plain[1][0], plain[3][8]]:  # rows end at different steps; one at its first token
        alone = [generate(m, [p], max_new_tokens=12, eos=[stop])[0] for p in prompts]
        assert generate_queue(m, prompts, batch_size, max_new_tokens=12, eos=[stop]) == alone
    assert generate_queue(m, prompts, 2, max_new_tokens=1) == [p[:1] for p in plain]
    for bad in (0, 1.5, True, "2"):
        for decode in (lambda b: generate_queue(m, prompts, b), lambda b: generate_early_exit(m, prompts, 0.5, batch_size=b),
                       lambda b: generate_kangaroo_batch(m, prompts, None, l=2, batch_size=b)):
            with pytest.raises(ValueError, match="batch_size"):
                decode(bad)


def test_kangaroo_queue_rows_are_their_runs_alone_whenever_they_join(llama_dir):
    """Row 1's prompt ends after every possible round in turn (its EOS is each of its tokens), so
    the next prompt joins after each; the rows accept drafts (holes); the last prompt is longer
    than every running row; the queue empties while rows still run; a pool of 1."""
    m = tiny(llama_dir, 0.0)
    a = random_adapter(m, 2, 0, lens_like=True)
    with torch.no_grad():  # A's attention reads its cache (a row's stale state there changes its drafts)
        a.attn.wo.weight.normal_(0, 0.05)
    prompts = [SHORT[3], SHORT[0], SHORT[1], SHORT[2], LONG]
    plain = generate(m, [prompts[1]], max_new_tokens=16, eos=[])[0]
    holes = 0
    for stop in dict.fromkeys(plain):  # every distinct token of row 1: it ends after each round in turn
        outs = same_as_alone(m, prompts, 2, adapter=a, max_new_tokens=16, gamma=4, eta=0.3, eos=[stop])
        holes += sum(r.holes for o in outs for r in o.rounds)
    assert holes > 0
    for batch_size, kw in [(1, dict(adapter=a)), (3, dict(adapter=None, l=2)), (2, dict(adapter=a, draft_vocab=20))]:
        same_as_alone(m, prompts, batch_size, max_new_tokens=12, gamma=3, eta=0.0, eos=[], **kw)


def test_sampled_rows_that_join_are_in_distribution(llama_dir):
    """N rows of a short prompt run; when they end, N copies of a longer prompt join (prefilled
    alone, seated after a shift); each joined row's second token against the exact distribution,
    through Kangaroo's queue, plain decoding's and the early exit's (tau above 1: it never exits)."""
    m = tiny(llama_dir, 0.3)
    a = random_adapter(m, 2, 2, lens_like=True)
    t, top_p, p = 0.8, 0.9, SHORT[1]
    g, N = torch.Generator().manual_seed(0), 1000  # N: chi_square_pvalue's power
    exact = second_token_marginal(m, p, t, top_p)
    kw = dict(max_new_tokens=3, temperature=t, top_p=top_p, generator=g, eos=[])
    for outs in (generate_kangaroo_batch(m, [SHORT[2]] * N + [p] * N, a, gamma=2, eta=0.0, batch_size=N, **kw),
                 generate_queue(m, [SHORT[2]] * N + [p] * N, N, **kw),
                 generate_early_exit(m, [SHORT[2]] * N + [p] * N, 1.1, batch_size=N, **kw)):
        counts = torch.zeros(m.cfg.vocab_size)
        for o in outs[N:]:
            counts[getattr(o, "tokens", o)[1]] += 1
        assert counts[exact == 0].sum() == 0
        assert chi_square_pvalue(counts, exact, N) > 0.01


@torch.no_grad()
@pytest.mark.parametrize("batch_size", [1, 2])
def test_exit_and_adainfer_queue_rows_are_their_runs_alone(llama_dir, batch_size):
    """The confidence exit and AdaInfer (its features and checks recorded) through a queue: each
    prompt's tokens, exit layers, logits and records are its run alone's; a batch runs at least
    as deep as each row wants."""
    m = load_model(llama_dir)
    prompts = [*EXIT_PROMPTS, LONG[:20], EXIT_PROMPTS[1]]
    tau = lens_quantile(m, 1)
    eos = ending_tokens([generate_early_exit(m, p, tau, N, eos=[]) for p in EXIT_PROMPTS])
    alone = [generate_early_exit(m, p, tau, N, eos=eos) for p in prompts]
    queue = generate_early_exit(m, prompts, tau, N, eos=eos, batch_size=batch_size)
    svm = SVM().fit([t for p in EXIT_PROMPTS for t in generate_adainfer(m, p, None, N, eos=[], collect=True).traces],
                    "final")
    alone += [generate_adainfer(m, p, svm, N, eos=eos, collect=True) for p in prompts]
    queue += generate_adainfer(m, prompts, svm, N, eos=eos, collect=True, batch_size=batch_size)
    assert len({len(r.tokens) for r in alone}) > 1  # rows end at different steps: others join then
    for q, a in zip(queue, alone):
        assert q.tokens == a.tokens and q.exit_layers == a.exit_layers
        assert all(torch.allclose(x, y, rtol=0, atol=1e-4) for x, y in zip(q.logits, a.logits))
        assert all(r >= w for r, w in zip(q.layers_run, q.layers_wanted))
        if hasattr(a, "checks"):
            assert len(q.checks) == len(a.checks) == len(a.exit_layers)
            for cq, ca in zip(q.checks, a.checks):
                assert [x[0] for x in cq] == [x[0] for x in ca] and [x[2] for x in cq] == [x[2] for x in ca]
                assert torch.allclose(torch.tensor([x[1] for x in cq]), torch.tensor([x[1] for x in ca]), atol=1e-5)
