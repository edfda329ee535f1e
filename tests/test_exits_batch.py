"""Per-token early exits over a batch (skip/exit_decode.py): each row's tokens, exit layers and
AdaInfer features and decisions equal its own unbatched run, with left padding, rows ending at
EOS at different steps, both fill modes, and rows that really exit at different layers."""
import pytest
import torch

from model import flops
from skip.adainfer import SVM, Threshold, predict, trace
from skip.adainfer_gen import generate_adainfer
from skip.baselines import generate_early_exit

PROMPTS = [[5, 6, 7, 8, 9], [9, 3, 4], [11, 12, 13, 14, 15, 16, 17], [20, 21]]  # different lengths: left padding
N = 10


def lens_quantile(model, column, vocab=None, q=0.6):
    """A quantile of one FEATURES column (0 gap, 1 top prob) below the last layer, over the
    layers of plain decoding: a threshold that exits at some layers and not at others."""
    plain = generate_adainfer(model, PROMPTS, None, N, vocab=vocab, eos=[], collect=True)
    traces = [t for r in plain for t in r.traces]
    return float(torch.cat([t.feats[:-1, column] for t in traces]).quantile(q))


def exits_differ(results):
    """Some step at which the live rows exit at different layers (so a batch runs deeper than a row)."""
    steps = max(len(r.exit_layers) for r in results)
    return any(len({r.exit_layers[s] for r in results if len(r.exit_layers) > s}) > 1 for s in range(steps))


def ending_tokens(alone):
    """EOS ids that end rows 0 and 2 early, each with a token row 1 never makes (so it runs to the budget)."""
    eos = []
    for row in (0, 2):
        eos += [next(t for t in alone[row].tokens[1:N - 1] if t not in alone[1].tokens)]
    return eos


def depths(alone):
    """The oracle of layers_run: per step, the deepest exit among the rows still decoding."""
    steps = max(len(r.exit_layers) for r in alone)
    return [max(r.exit_layers[s] + 1 for r in alone if len(r.exit_layers) > s) for s in range(steps)]


def assert_rows_equal(batch, alone):
    assert len(batch) == len(alone)
    for b, a in zip(batch, alone):
        assert b.tokens == a.tokens and b.exit_layers == a.exit_layers
        assert all(torch.allclose(x, y, rtol=0, atol=1e-4) for x, y in zip(b.logits, a.logits))
        assert a.layers_run == a.layers_wanted  # alone, a row runs what it wants
    run = depths(alone)
    for b in batch:
        assert b.layers_run == run[:len(b.exit_layers)]


def check_early_exit(model, fill="propagate", vocab=None):
    tau = lens_quantile(model, 1, vocab)
    eos = ending_tokens([generate_early_exit(model, p, tau, N, eos=[], vocab=vocab, fill=fill) for p in PROMPTS])
    alone = [generate_early_exit(model, p, tau, N, eos=eos, vocab=vocab, fill=fill) for p in PROMPTS]
    batch = generate_early_exit(model, PROMPTS, tau, N, eos=eos, vocab=vocab, fill=fill)
    assert_rows_equal(batch, alone)
    assert exits_differ(batch)  # rows stopped at different layers within a step
    assert len({len(r.tokens) for r in batch}) > 1 and min(len(r.tokens) for r in batch) < N  # EOS at its own step


@torch.no_grad()
def test_batched_early_exit_rows_equal_their_unbatched_runs(method_pair):
    check_early_exit(method_pair[1])


@torch.no_grad()
@pytest.mark.parametrize("fill,cheap", [("recompute", False), ("propagate", True)])
def test_batched_early_exit_recompute_and_cheap_head(llama_dir, fill, cheap):
    from model import load_model
    model = load_model(llama_dir)
    check_early_exit(model, fill, torch.arange(0, model.cfg.vocab_size, 2) if cheap else None)


@torch.no_grad()
def test_batched_early_exit_teacher_forced(llama_dir):
    from model import load_model
    model = load_model(llama_dir)
    tau = lens_quantile(model, 1)
    forced = [[9, 10, 11, 12, 13], [4, 5], [30, 31, 32, 33, 34, 35, 36], [40, 41, 42]]  # own budgets
    alone = [generate_early_exit(model, p, tau, forced=f) for p, f in zip(PROMPTS, forced)]
    batch = generate_early_exit(model, PROMPTS, tau, forced=forced)
    assert_rows_equal(batch, alone)
    assert exits_differ(batch) and [r.tokens for r in batch] == forced


@torch.no_grad()
def test_the_batch_runs_its_deepest_rows_layers_and_fills_the_rest(llama_dir):
    """The decoder's record: per fed-back step, layers_run layers over the live rows, and a K/V
    fill for each layer above them; the deepest row is the oracle (the unbatched runs)."""
    from model import load_model
    model = load_model(llama_dir)
    L, tau = model.cfg.n_layers, lens_quantile(model, 1)
    alone = [generate_early_exit(model, p, tau, N, eos=[]) for p in PROMPTS]
    with model.recording() as runs:
        batch = generate_early_exit(model, PROMPTS, tau, N, eos=[])
    run = depths(alone)
    assert batch[0].layers_run == run and min(run) < L and exits_differ(batch)  # short of the last layer, at times
    decode_layers = [x for x in runs if isinstance(x, flops.LayerRun) and x.n == 1]
    assert len(decode_layers) == sum(run) and all(x.batch == len(PROMPTS) for x in decode_layers)
    assert sum(isinstance(x, flops.KVRun) for x in runs) == sum(L - r for r in run)


@torch.no_grad()
def test_a_rows_output_does_not_depend_on_its_batch_mates(llama_dir):
    from model import load_model
    model = load_model(llama_dir)
    tau = lens_quantile(model, 1)
    order = [2, 0, 3, 1]
    batch = generate_early_exit(model, PROMPTS, tau, N, eos=[])
    permuted = generate_early_exit(model, [PROMPTS[i] for i in order], tau, N, eos=[])
    assert exits_differ(batch)
    for b, i in zip(permuted, order):
        assert b.tokens == batch[i].tokens and b.exit_layers == batch[i].exit_layers
    method_pair = generate_early_exit(model, PROMPTS[1:3], tau, N, eos=[])  # other mates, fewer rows
    assert [(r.tokens, r.exit_layers) for r in method_pair] == [(r.tokens, r.exit_layers) for r in batch[1:3]]


def check_adainfer(model, check_every=1, vocab=None, fill="propagate"):
    clf = Threshold(lens_quantile(model, 0, vocab))
    kw = dict(check_every=check_every, vocab=vocab, fill=fill)
    eos = ending_tokens(generate_adainfer(model, PROMPTS, clf, N, eos=[], **kw))
    alone = [generate_adainfer(model, p, clf, N, eos=eos, **kw) for p in PROMPTS]
    batch = generate_adainfer(model, PROMPTS, clf, N, eos=eos, **kw)
    assert_rows_equal(batch, alone)
    assert exits_differ(batch) and len({len(r.tokens) for r in batch}) > 1
    for b, a in zip(batch, alone):  # the classifier saw the same features and took the same decisions
        assert len(b.checks) == len(a.checks)
        for cb, ca in zip(b.checks, a.checks):
            assert [(l, t) for l, _, t in cb] == [(l, t) for l, _, t in ca]
            assert torch.allclose(torch.tensor([r for _, r, _ in cb]), torch.tensor([r for _, r, _ in ca]), atol=1e-5)
            assert [s for _, s in clf.decisions([r for _, r, _ in cb])] == \
                [s for _, s in clf.decisions([r for _, r, _ in ca])]


@torch.no_grad()
def test_batched_adainfer_generation_rows_equal_their_unbatched_runs(method_pair):
    check_adainfer(method_pair[1])


@torch.no_grad()
@pytest.mark.parametrize("check_every,cheap,fill", [(2, False, "recompute"), (1, True, "propagate")])
def test_batched_adainfer_generation_sparse_checks_cheap_head_recompute(llama_dir, check_every, cheap, fill):
    from model import load_model
    model = load_model(llama_dir)
    check_adainfer(model, check_every, torch.arange(0, model.cfg.vocab_size, 2) if cheap else None, fill)


@torch.no_grad()
def test_batched_generation_traces_and_svm_exits_equal_unbatched(llama_dir):
    from model import load_model
    model = load_model(llama_dir)
    batch = generate_adainfer(model, PROMPTS, None, N, eos=[], collect=True)
    alone = [generate_adainfer(model, p, None, N, eos=[], collect=True) for p in PROMPTS]
    for b, a in zip(batch, alone):
        assert b.tokens == a.tokens and len(b.traces) == len(a.traces) == N - 1
        for tb, ta in zip(b.traces, a.traces):
            assert tb.top1 == ta.top1 and torch.allclose(tb.feats, ta.feats, rtol=0, atol=1e-5)
    svm = SVM().fit([t for r in alone for t in r.traces], "final")
    alone = [generate_adainfer(model, p, svm, N, eos=[]) for p in PROMPTS]
    batch = generate_adainfer(model, PROMPTS, svm, N, eos=[])
    assert_rows_equal(batch, alone)
    assert exits_differ(batch)


@torch.no_grad()
@pytest.mark.parametrize("choices", [False, True])
def test_batched_classification_pass_equals_unbatched_predict_and_trace(llama_dir, choices):
    from model import load_model
    model = load_model(llama_dir)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 8, 5, 6, 4, 7)]
    vocab = torch.tensor([10, 20, 30, 40]) if choices else None
    alone = [trace(model, p, answer=3, vocab=vocab) for p in prompts]
    batch = trace(model, prompts, [3] * len(prompts), vocab=vocab)
    for b, a in zip(batch, alone):
        assert b.top1 == a.top1 and b.answer == a.answer and torch.allclose(b.feats, a.feats, rtol=0, atol=1e-5)
    gaps = torch.cat([t.feats[:-1, 0] for t in alone])
    for clf in (Threshold(float(gaps.quantile(0.5))), SVM().fit(alone, "final")):
        expected = [predict(model, p, clf, vocab) for p in prompts]
        assert predict(model, prompts, clf, vocab) == expected
        assert len({layer for _, layer in expected}) > 1  # the rows stop at different layers


@torch.no_grad()
def test_smollm2_batched_early_exit_equals_unbatched(smollm2):
    model, tok = smollm2
    texts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time, in a small village by the sea, there",
             "Water boils at"]
    prompts, vocab = [tok.encode(t) for t in texts], torch.arange(4096)  # a cheap head screens the checks
    alone = [generate_early_exit(model, p, 0.9, 12, eos=[], vocab=vocab) for p in prompts]
    batch = generate_early_exit(model, prompts, 0.9, 12, eos=[], vocab=vocab)
    assert_rows_equal(batch, alone)
    assert exits_differ(batch)
