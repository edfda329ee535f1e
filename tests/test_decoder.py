"""Golden tests: our decoder against transformers on tiny random Llama and OPT models."""
import torch

from model import KVCache, generate, left_pad, positions

TOL = 1e-5


def embedded(model, B, T, seed):
    """Random ids (B, T), their positions and embeddings."""
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    pos = positions(None, 0, T)
    return ids, pos, model.embed_tokens(ids, pos)


def hidden_states(model, ids, layers=None):
    """Embeddings and every layer's output, through the public per-layer API."""
    pos = positions(None, 0, ids.shape[1])
    h = model.embed_tokens(ids, pos)
    outs = [h]
    model.run_layers(h, pos, layers=layers, callback=lambda i, h, a, m: outs.append(h))
    return outs


@torch.no_grad()
def test_logits_and_every_hidden_state_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = hf(ids, output_hidden_states=True)
    outs = hidden_states(ours, ids)
    L = ours.cfg.n_layers
    assert len(ref.hidden_states) == L + 1
    for i in range(L):  # transformers' last entry is after the final norm (and project_out)
        assert (ref.hidden_states[i] - outs[i]).abs().max() <= TOL, f"hidden state {i}"
    assert (ref.hidden_states[L] - ours.final(outs[L])).abs().max() <= TOL
    logits = ours(ids)
    assert ref.logits.abs().max() > 1.0  # the oracle is not trivially small
    assert (ref.logits - logits).abs().max() <= TOL


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(pair):
    _, ours = pair
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    full = ours(ids)
    cache = KVCache.for_model(ours.cfg, 1, 20)
    steps = [ours(ids[:, :8], cache=cache)]
    for t in range(8, 20):
        steps.append(ours(ids[:, t:t + 1], cache=cache, start=t))
    assert cache.lengths == [20] * ours.cfg.n_layers
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL


@torch.no_grad()
def test_layers_split_at_k_equal_all_layers(pair):
    _, ours = pair
    _, pos, h0 = embedded(ours, 2, 12, seed=3)
    whole = ours.run_layers(h0, pos)
    L = ours.cfg.n_layers
    for k in range(L + 1):
        saved = ours.run_layers(h0, pos, layers=range(0, k))
        assert torch.equal(ours.run_layers(saved, pos, layers=range(k, L)), whole)


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, ours.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 13, 9)]
    ids, mask = left_pad(prompts, pad_id=0)
    batched = ours(ids, pad_mask=mask)  # (3, 13, V)
    for b, p in enumerate(prompts):
        alone = ours(torch.tensor([p]))
        assert (batched[b, -len(p):] - alone[0]).abs().max() <= TOL
    # and decoding on top of the padded cache
    new = generate(ours, prompts, max_new_tokens=8, eos=[])
    for b, p in enumerate(prompts):
        assert new[b] == generate(ours, [p], max_new_tokens=8, eos=[])[0]


@torch.no_grad()
def test_greedy_generation_identical_to_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(5)
    for n in (1, 7):
        prompt = torch.randint(3, ours.cfg.vocab_size, (1, n), generator=g)
        # no EOS on either side (min_new_tokens would instead mask EOS out of transformers' argmax)
        ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=[],
                          pad_token_id=ours.cfg.pad_token_id)[0, n:].tolist()
        assert len(ref) == 32
        assert generate(ours, prompt.tolist(), max_new_tokens=32, eos=[])[0] == ref


@torch.no_grad()
def test_fill_kv_writes_what_running_the_layer_writes(pair):
    _, ours = pair
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(6))
    pos = positions(None, 0, 10)
    ran, filled = KVCache.for_model(ours.cfg, 1, 10), KVCache.for_model(ours.cfg, 1, 10)
    inputs = [ours.embed_tokens(ids, pos)]
    ours.run_layers(inputs[0], pos, cache=ran, callback=lambda i, h, a, m: inputs.append(h))
    for i in range(ours.cfg.n_layers):
        ours.fill_kv(i, inputs[i], pos, filled, 0)
    assert torch.equal(ran.k, filled.k) and torch.equal(ran.v, filled.v)


@torch.no_grad()
def test_callback_sees_attention_and_mlp_outputs_and_can_stop(pair):
    _, ours = pair
    _, pos, h0 = embedded(ours, 1, 6, seed=7)
    seen = []

    def cb(i, h, a, m):
        seen.append((i, a, m))
        return i == 1

    out = ours.run_layers(h0, pos, callback=cb)
    assert [i for i, _, _ in seen] == [0, 1]
    assert torch.equal(out, ours.run_layers(h0, pos, layers=[0, 1]))
    if ours.cfg.pre_norm:  # pre-LN: the block output is exactly h + attn + mlp
        h1 = ours.run_layers(h0, pos, layers=[0])
        _, a, m = seen[0]
        assert (h0 + a + m - h1).abs().max() <= TOL


@torch.no_grad()
def test_logit_lens_last_position_and_vocab_subset(pair):
    _, ours = pair
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    pos = positions(None, 0, 6)
    h = ours.run_layers(ours.embed_tokens(ids, pos), pos, layers=range(2))
    full = ours.logits(h)
    subset = torch.tensor([5, 0, 42])
    assert torch.allclose(ours.logits(h, last_only=True), full[:, -1:], atol=TOL)
    assert torch.allclose(ours.logits(h, last_only=True, vocab=subset), full[:, -1:, subset], atol=TOL)
