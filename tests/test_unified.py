"""Unified Layer Skipping and its baselines, checked against a cache-free layer-wise reference."""
import pytest
import torch

from model import KVCache, flops, generate, load_model
from skip.baselines import (ConfidenceCheck, calibrate_threshold, generate_early_exit, generate_skipdecode,
                            skipdecode_layers, skipdecode_schedule)
from skip.exit_decode import decode_with_exit
from model.flops import HeadRun
from skip.layerwise import layerwise_forward, prompt_then
from skip.unified import generate_unified, kept_layers

from conftest import LLAMA, build_hf, reference_decode


@pytest.mark.parametrize("L,r,expected", [
    (30, 2, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 29]),
    (30, 3, [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]),
    (30, 5, [0, 6, 12, 18, 24, 29]),
    (30, 10, [0, 15, 29]),
    (32, 2, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 31]),
    (32, 4, [0, 4, 8, 12, 16, 20, 24, 31]),
    (30, 1, list(range(30))),
])
def test_layer_rule_gives_the_official_sets(L, r, expected):
    assert kept_layers(L, r) == expected


@pytest.mark.parametrize("L", [4, 12, 30, 32, 40])
def test_first_and_last_layer_always_kept(L):
    for r in range(1, L // 2 + 1):
        K = kept_layers(L, r)
        assert K[0] == 0 and K[-1] == L - 1 and len(K) == int(L / r) and K == sorted(set(K))
        R = kept_layers(L, r + 0.5, real_valued=True)
        assert R[0] == 0 and R[-1] == L - 1 and len(R) == max(2, round(L / (r + 0.5)))


def test_bad_speedups_raise():
    with pytest.raises(ValueError, match="must be a finite number >= 1"):
        kept_layers(30, 0.5)
    with pytest.raises(ValueError, match="larger than the number of layers"):
        kept_layers(30, 31)
    with pytest.raises(ValueError, match="not an integer; pass real_valued=True"):
        kept_layers(30, 2.5)
    with pytest.raises(ValueError, match="needs n >= 2"):
        kept_layers(30, 30)


@torch.no_grad()
def test_r1_equals_plain_decoding(method_pair):
    _, model = method_pair
    prompts = [[5, 6, 7, 8], [9, 3]]
    assert generate_unified(model, prompts, 1, max_new_tokens=10, eos=[]) == \
        generate(model, prompts, max_new_tokens=10, eos=[])


@torch.no_grad()
@pytest.mark.parametrize("r,real", [(2, False), (1.5, True)])
def test_unified_decoding_equals_cache_free_reference_batched_and_alone(method_pair, r, real):
    _, model = method_pair
    prompts = [[5, 6, 7, 8, 9, 10], [9, 3], [11, 12, 13]]
    K = kept_layers(model.cfg.n_layers, r, real)
    assert len(K) < model.cfg.n_layers
    ref = reference_decode(model, prompts, lambda i: K, 8)
    assert generate_unified(model, prompts, r, real, max_new_tokens=8, eos=[]) == ref
    for p, expected in zip(prompts, ref):
        assert generate_unified(model, [p], r, real, max_new_tokens=8, eos=[])[0] == expected


@torch.no_grad()
def test_skipped_layers_hold_only_prompt_keys_values(method_pair):
    _, model = method_pair
    L, K = model.cfg.n_layers, kept_layers(model.cfg.n_layers, 2)
    cache = KVCache.for_model(model.cfg, 1, 16)
    model(torch.tensor([[5, 6, 7]]), cache=cache)
    for t in range(3, 8):
        model(torch.tensor([[4]]), cache=cache, start=t, layers=K)
    assert cache.lengths == [8 if layer in K else 3 for layer in range(L)]


@pytest.mark.parametrize("r", [2, 3, 5])
def test_skipdecode_spends_exactly_unifieds_budget_at_the_benchmark_lengths(r):
    L, B = 30, len(kept_layers(30, r))
    for n in (1, 2, 23, 39, 63, 255):  # throughput, generation (40 new tokens), teacher forcing, fine-tuning
        s = skipdecode_schedule(L, r, n)
        assert sum(s) == n * B and all(a >= b for a, b in zip(s, s[1:])) and 2 <= min(s) and max(s) <= L
        for t in range(n):
            layers = list(skipdecode_layers(L, s, t))
            assert len(layers) == s[t] and layers[0] == 0 and layers[1:] == list(range(L - s[t] + 1, L))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny Llama with SmolLM2's 30 layers, so the budgets are the benchmark's."""
    path = tmp_path_factory.mktemp("deep")
    build_hf("llama", dict(LLAMA, num_hidden_layers=30, hidden_size=32, num_attention_heads=2)).save_pretrained(path)
    return load_model(path)


@torch.no_grad()
@pytest.mark.parametrize("r", [2, 3, 5])
def test_measured_layers_per_token_equal_unifieds_when_rows_stop_at_eos(deep, r):
    """Measured from the decoder's record: a batch runs every position until its last row ends,
    so a row that stops at EOS does not change what each position costs."""
    prompts, B = [[5, 6, 7, 8], [9, 3]], len(kept_layers(30, r))
    for method in (generate_skipdecode, generate_unified):
        full = method(deep, prompts, r, max_new_tokens=40, eos=[])
        eos = [next(t for t in full[0][:11] if t not in full[1])]  # row 0 stops by its 11th token, row 1 never
        with deep.recording() as record:
            out = method(deep, prompts, r, max_new_tokens=40, eos=eos)
        tokens, layers, _ = flops.per_decode_token(deep.cfg, record)
        assert len(out[0]) <= 11 and out[1] == full[1] and tokens == 2 * 39
        assert abs(layers / tokens - B) <= 0.5, method.__name__


@torch.no_grad()
def test_skipdecode_never_reads_a_missing_key_value_and_equals_reference(method_pair):
    _, model = method_pair
    L, prompts, n = model.cfg.n_layers, [[5, 6, 7, 8], [9, 3]], 8
    schedule = skipdecode_schedule(L, 2, n)
    # the cache raises on any read over a gap, so decoding at all proves no missing key/value
    out = generate_skipdecode(model, prompts, 2, max_new_tokens=n, eos=[])
    assert out == reference_decode(model, prompts, lambda i: skipdecode_layers(L, schedule, i), n)


@torch.no_grad()
def test_early_exit_equals_reference_with_state_propagation(method_pair):
    _, model = method_pair
    prompt, L = [5, 6, 7, 8], model.cfg.n_layers
    tau = calibrate_threshold(model, [prompt], r=2, max_new_tokens=10)
    res = generate_early_exit(model, prompt, tau, max_new_tokens=10, eos=[])
    assert len(res.exit_layers) == 9 and min(res.exit_layers) < L - 1  # some tokens did exit early
    ref = reference_decode(model, [prompt], lambda i: range(res.exit_layers[i] + 1), 10)[0]
    assert res.tokens == ref


@torch.no_grad()
def test_early_exit_that_never_fires_is_plain_decoding_and_flops_count_every_check(method_pair):
    _, model = method_pair
    cfg, prompt, n = model.cfg, [5, 6, 7, 8], 6
    with model.recording() as runs:
        res = generate_early_exit(model, prompt, tau=1.01, max_new_tokens=n, eos=[])
    assert res.tokens == generate(model, [prompt], max_new_tokens=n, eos=[])[0]
    assert res.exit_layers == [cfg.n_layers - 1] * (n - 1)
    steps = sum(flops.layer_flops(cfg, 1, len(prompt) + s) for s in range(n - 1))
    expected = flops.prefill_flops(cfg, len(prompt)) + cfg.n_layers * steps + \
        (n - 1) * (flops.embed_flops(cfg, 1) + cfg.n_layers * flops.head_flops(cfg, 1))
    assert flops.total(cfg, runs) == expected


@torch.no_grad()
def test_cheap_exit_check_decides_as_the_full_head(method_pair):
    """A cheap head over ids that hold every layer's full top-1 (plus random others) gives the
    full-head check's exits, tokens and logits, never with more full-head calls."""
    _, model = method_pair
    prompt, n, V = [5, 6, 7, 8], 12, model.cfg.vocab_size
    tau = calibrate_threshold(model, [prompt], r=1.5, max_new_tokens=n)
    top1 = set()

    class Watched(ConfidenceCheck):  # records the full lens top-1 at every layer it checks
        def __call__(self, *args):
            stop = super().__call__(*args)
            top1.add(int(self.logits.argmax()))
            return stop
    full = decode_with_exit(model, prompt, lambda h, rows: Watched(model, tau), n, eos=[])
    vocab = torch.tensor(sorted(top1 | set(torch.randperm(V, generator=torch.Generator().manual_seed(0))[:8].tolist())))
    assert len(vocab) < V
    with model.recording() as runs_full:
        generate_early_exit(model, prompt, tau, n, eos=[])
    with model.recording() as runs_cheap:
        cheap = generate_early_exit(model, prompt, tau, n, eos=[], vocab=vocab)
    assert cheap.tokens == full.tokens and cheap.exit_layers == full.exit_layers
    assert min(full.exit_layers) < model.cfg.n_layers - 1  # some tokens did exit
    assert len(cheap.logits) == len(full.logits) == n and all(map(torch.equal, cheap.logits, full.logits))
    heads = lambda runs, v: sum(isinstance(x, HeadRun) and x.vocab == v for x in runs)
    assert heads(runs_cheap, V) <= heads(runs_full, V) and heads(runs_cheap, len(vocab)) > 0


@torch.no_grad()
def test_calibrated_threshold_hits_the_target_layer_count(method_pair):
    _, model = method_pair
    prompts = [[5, 6, 7, 8], [9, 3, 4]]
    tau = calibrate_threshold(model, prompts, r=2, max_new_tokens=12)
    exits = [e for p in prompts for e in generate_early_exit(model, p, tau, 12, eos=[]).exit_layers]
    assert abs(sum(e + 1 for e in exits) / len(exits) - model.cfg.n_layers / 2) <= 1.0


@torch.no_grad()
def test_teacher_forced_early_exit_matches_reference_logits(method_pair):
    _, model = method_pair
    prompt, forced = [5, 6, 7, 8], [9, 10, 11, 12, 13]
    tau = calibrate_threshold(model, [prompt], r=2, max_new_tokens=6)
    res = generate_early_exit(model, prompt, tau, forced=forced)
    runs = prompt_then(model.cfg.n_layers, len(prompt), [range(e + 1) for e in res.exit_layers])
    ref = layerwise_forward(model, torch.tensor([prompt + forced[:-1]]), runs)[0, len(prompt) - 1:]
    assert res.tokens == forced
    assert (torch.stack(res.logits) - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_unified_sampling_is_seeded_and_top_k_1_is_greedy(method_pair):
    _, model = method_pair
    prompts = [[5, 6, 7, 8], [9, 3]]
    greedy = generate_unified(model, prompts, 2, max_new_tokens=6, eos=[])
    assert generate_unified(model, prompts, 2, max_new_tokens=6, eos=[], temperature=0.8, top_k=1) == greedy
    run = lambda seed: generate_unified(model, prompts, 2, max_new_tokens=6, eos=[], temperature=1.0,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed))
    assert run(3) == run(3) != run(4)
