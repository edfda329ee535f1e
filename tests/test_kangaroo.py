"""Kangaroo against its oracles: plain greedy decoding (token for token), the exact target
distribution (chi-square), and a count of what ran."""
import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import chisquare

from model import generate, load_model
from skip.kangaroo import accept_sampled, generate_kangaroo, probs
from skip.kangaroo_adapter import Adapter, AdapterError
from skip.kangaroo_files import load_adapter, save_adapter
from skip.train.kangaroo import RECIPES, distill_loss, linear_lr, tokens_by_frequency
from tokenizer import encode_chat

from skip import WEIGHTS

from conftest import chi_square_pvalue, random_adapter

PROMPT = [5, 6, 7, 8, 9, 10]


def tiny(llama_dir, deep_scale):
    """The tiny Llama with its layers [2, L) scaled: 0 makes the deep layers the identity, so
    drafts read off layer 2 agree with M; 1 leaves a random model whose drafts rarely agree."""
    m = load_model(llama_dir)
    with torch.no_grad():
        for b in m.blocks[2:]:
            b.attn.wo.weight.mul_(deep_scale)
            b.mlp.down.weight.mul_(deep_scale)
    return m


@pytest.mark.parametrize("deep_scale", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_greedy_equals_plain_greedy_decoding(llama_dir, deep_scale, seed):
    m = tiny(llama_dir, deep_scale)
    prompt = PROMPT[:3 + seed]
    ref = generate(m, [prompt], max_new_tokens=16, eos=[])[0]
    accepted = 0
    # every gamma and every eta, each gamma beside two etas (tests/test_kangaroo_batch.py runs more
    # settings through this file, row by row)
    for eta, gamma in [(0.0, 0), (0.6, 0), (0.3, 1), (1.0, 1), (0.0, 3), (0.6, 3), (0.3, 6), (1.0, 6)]:
        for a in [random_adapter(m, 2, seed, lens_like=seed != 1), None]:
            out = generate_kangaroo(m, prompt, a, l=2, max_new_tokens=16, gamma=gamma, eta=eta, eos=[])
            assert out.tokens == ref, (eta, gamma, a is None)
            assert len(out.tokens) == sum(r.accepted + 1 for r in out.rounds) + 1
            assert all(r.drafted <= gamma for r in out.rounds)
            accepted += sum(r.accepted for r in out.rounds)
        cheap = generate_kangaroo(m, prompt, random_adapter(m, 2, seed, True), max_new_tokens=16, gamma=gamma,
                                  eta=eta, draft_vocab=20, eos=[])
        assert cheap.tokens == ref
    if deep_scale == 0.0:
        assert accepted > 0  # the accept path ran


def test_greedy_stops_at_eos_like_plain_decoding(llama_dir):
    m = tiny(llama_dir, 0.0)
    ref = generate(m, [PROMPT], max_new_tokens=40, eos=[2])[0]
    for gamma in [1, 6]:
        assert generate_kangaroo(m, PROMPT, l=2, max_new_tokens=40, gamma=gamma, eta=0.0, eos=[2]).tokens == ref
    stop = ref[5]  # a token that plain decoding emits mid-way: both stop right after it
    first = generate(m, [PROMPT], max_new_tokens=40, eos=[stop])[0]
    assert generate_kangaroo(m, PROMPT, l=2, max_new_tokens=40, gamma=6, eta=0.0, eos=[stop]).tokens == first


@pytest.mark.parametrize("deep_scale", [0.0, 1.0])
def test_caches_hold_the_accepted_length_and_shallow_layers_never_recompute(llama_dir, deep_scale):
    m = tiny(llama_dir, deep_scale)
    a = random_adapter(m, 2, 0, lens_like=True)
    L, T = m.cfg.n_layers, len(PROMPT)
    seen = []

    def on_round(tokens, caches):
        cache, acache = caches
        n = T + len(tokens) - 1  # every committed token but the newest is cached
        assert cache.lengths == [n] * L
        seen.append((n, acache.lengths[0]))

    with m.recording() as runs:
        out = generate_kangaroo(m, PROMPT, a, max_new_tokens=30, gamma=4, eta=0.0, eos=[], on_round=on_round)
    for (n, adapter_len), r in zip(seen, out.rounds):
        # A lags by one slot exactly when every draft was accepted (it had not read the last
        # one); the next round catches it up, as the official code does
        assert adapter_len == (n - 1 if r.accepted == r.drafted else n)
    layer0 = [r for r in runs if getattr(r, "layer", None) == 0]
    deep = [r for r in runs if getattr(r, "layer", None) == 2]
    assert sum(r.n for r in layer0) == T + sum(r.drafted + 1 for r in out.rounds)
    assert [r.n for r in deep] == [T] + [r.drafted + 1 for r in out.rounds]  # one verification pass a round
    assert all(r.n == 1 for r in layer0[1:])


def test_sampling_rule_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.1, 0.1])
    N, counts, accepted = 20000, torch.zeros(6), 0
    for _ in range(N):
        d = int(torch.multinomial(q, 1, generator=g))
        a, nxt = accept_sampled(torch.stack([p, p]), q[None], [d], g)
        counts[d if a else nxt] += 1
        accepted += a
    assert chisquare(counts.numpy(), (p * N).numpy()).pvalue > 0.01
    assert abs(accepted / N - torch.minimum(p, q).sum()) < 0.02  # acceptance = sum min(p, q)
    for _ in range(200):  # q = p: every draft is accepted
        d = int(torch.multinomial(p, 1, generator=g))
        assert accept_sampled(torch.stack([p, p]), p[None], [d], g)[0] == 1


@torch.no_grad()
def second_token_marginal(m, prompt, t, top_p):
    """Plain sampling's marginal of the second new token, sum_x1 p(x1) p(x2 | x1), computed exactly: (V,)."""
    p1 = probs(m(torch.tensor([prompt]), last_only=True)[0, -1], t, top_p)
    x1 = p1.nonzero()[:, 0]
    p2 = probs(m(torch.tensor([prompt + [int(x)] for x in x1]), last_only=True)[:, -1], t, top_p)
    return (p1[x1, None] * p2).sum(0)


def test_sampled_decoding_keeps_the_target_distribution(llama_dir):
    """The second generated token comes out of a draft round; its marginal must equal
    sum_x1 p(x1) p(x2 | x1) of plain sampling, computed exactly."""
    m = tiny(llama_dir, 0.3)
    a = random_adapter(m, 2, 0, lens_like=True)
    t, top_p = 1.5, 0.9
    exact = second_token_marginal(m, PROMPT, t, top_p)
    g = torch.Generator().manual_seed(0)
    N, counts = 1000, torch.zeros(m.cfg.vocab_size)  # N: chi_square_pvalue's power
    for _ in range(N):
        out = generate_kangaroo(m, PROMPT, a, max_new_tokens=3, gamma=2, eta=0.0, temperature=t, top_p=top_p,
                                generator=g, eos=[])
        counts[out.tokens[1]] += 1
    assert counts[exact == 0].sum() == 0
    assert chi_square_pvalue(counts, exact, N) > 0.01


def test_adapter_round_trip_and_clear_errors(llama_dir, tmp_path):
    m = load_model(llama_dir)
    a = random_adapter(m, 2, 0, lens_like=False)
    save_adapter(a, tmp_path / "a", steps=3)
    b = load_adapter(tmp_path / "a", m)
    assert b.l == 2 and torch.equal(b.frequent, a.frequent)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert json.loads((tmp_path / "a" / "adapter.json").read_text())["steps"] == 3
    assert (generate_kangaroo(m, PROMPT, a, max_new_tokens=8, eta=0.0).rounds
            == generate_kangaroo(m, PROMPT, b, max_new_tokens=8, eta=0.0).rounds)

    with pytest.raises(AdapterError, match="adapter.safetensors is missing"):
        (tmp_path / "missing").mkdir()
        (tmp_path / "missing" / "adapter.json").write_text((tmp_path / "a" / "adapter.json").read_text())
        load_adapter(tmp_path / "missing", m)
    with pytest.raises(AdapterError, match="another model: dim 32"):
        meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
        (tmp_path / "a" / "adapter.json").write_text(json.dumps({**meta, "dim": 32}))
        load_adapter(tmp_path / "a", m)
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
    data = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    (tmp_path / "a" / "adapter.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(AdapterError, match="corrupted"):
        load_adapter(tmp_path / "a", m)
    save_file({"attn.wq.weight": torch.zeros(3, 3)}, str(tmp_path / "a" / "adapter.safetensors"))
    with pytest.raises(AdapterError, match=r"missing \['attn.wk.weight'.*mis-shaped \['attn.wq.weight \(3, 3\)"):
        load_adapter(tmp_path / "a", m)


def test_bad_settings_raise(llama_dir):
    m = load_model(llama_dir)
    with pytest.raises(ValueError, match="exit layer"):
        generate_kangaroo(m, PROMPT, None, l=None)
    with pytest.raises(ValueError, match="exit layer"):
        generate_kangaroo(m, PROMPT, None, l=m.cfg.n_layers)
    with pytest.raises(ValueError, match="draft_vocab"):
        generate_kangaroo(m, PROMPT, None, l=2, draft_vocab=10)
    a = random_adapter(m, 2, 0, True)  # every token ranked: -1 would drop one, 0 silently mean none
    V = m.cfg.vocab_size
    for k in (-1, 0, V + 1, True, 2.0):
        with pytest.raises(ValueError, match=rf"draft_vocab must be None or an integer in \[1, {V}\]"):
            generate_kangaroo(m, PROMPT, a, draft_vocab=k)
    with pytest.raises(ValueError, match="eta"):
        generate_kangaroo(m, PROMPT, None, l=2, eta=1.5)
    for gamma in ("3", 2.5, -1):
        with pytest.raises(ValueError, match="integer gamma"):
            generate_kangaroo(m, PROMPT, None, l=2, gamma=gamma)
    # a huge gamma costs nothing up front: the caches grow with the tokens actually drafted
    ref = generate(m, [PROMPT], max_new_tokens=8, eos=[])[0]
    assert generate_kangaroo(m, PROMPT, None, l=2, gamma=10**9, max_new_tokens=8, eos=[]).tokens == ref
    with pytest.raises(ValueError, match="token ids"):
        generate_kangaroo(m, [m.cfg.vocab_size], None, l=2)
    with pytest.raises(AdapterError, match="exit layer"):
        Adapter(m.cfg, 0)


def test_distillation_loss_is_the_soft_cross_entropy(llama_dir):
    m = load_model(llama_dir)
    a = random_adapter(m, 2, 0, lens_like=False)
    torch.manual_seed(0)
    h_l, h_L = torch.randn(2, 7, m.cfg.dim), torch.randn(2, 7, m.cfg.dim)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:6], mask[1, 4:] = True, True
    loss, agree = distill_loss(m, a, h_l, h_L, mask)
    rows = []  # one sequence at a time, position by position, with F.cross_entropy's soft targets
    for b in range(2):
        for t in range(7):
            if mask[b, t]:
                z = a(h_l[b:b + 1, :t + 1], m.rope(torch.arange(t + 1)[None]))[0, -1]
                rows.append(torch.nn.functional.cross_entropy(z @ m.head.weight.T, m.logits(h_L[b:b + 1, t:t + 1])[0, 0].softmax(-1)))
    assert torch.allclose(loss, torch.stack(rows).mean(), atol=1e-5)


def test_tokens_by_frequency_match_a_count():
    rng = random.Random(0)
    seqs = [{"prompt": 3, "ids": [rng.randrange(12) for _ in range(30)]} for _ in range(5)]
    order = tokens_by_frequency(seqs, 12)
    c = Counter(t for s in seqs for t in s["ids"][3:])
    assert order == sorted(range(12), key=lambda v: (-c[v], v))


SMOL_PROMPTS = ["Explain in two sentences why the sky is blue.", "Solve: 12 * 7 + 5 = ?"]  # four more, batched:
# tests/test_kangaroo_batch.py


def test_smollm2_with_the_trained_adapter_equals_plain_greedy(smollm2):
    path = WEIGHTS / "kangaroo-l2"
    m, tok = smollm2
    a = load_adapter(path, m)
    for text in SMOL_PROMPTS:
        ids = encode_chat(tok, text)
        ref = generate(m, [ids], max_new_tokens=16)[0]
        assert generate_kangaroo(m, ids, a, max_new_tokens=16).tokens == ref
        assert generate_kangaroo(m, ids, a, max_new_tokens=16, draft_vocab=4096).tokens == ref


def test_prompt_mix_has_each_kind_in_its_share_and_is_reproducible(data_dir):
    from skip.train.kangaroo import MIX, prompt_mix
    texts = prompt_mix(100, data_dir, seed=3)
    assert texts == prompt_mix(100, data_dir, seed=3) and texts != prompt_mix(100, data_dir, seed=4)
    gsm = {json.loads(line)["question"] for line in (data_dir / "gsm8k" / "train.jsonl").open()}
    csqa = {json.loads(line)["question"]["stem"] for line in (data_dir / "csqa" / "train_rand_split.jsonl").open()}
    alpaca = {json.loads(line)["instruction"] for line in (data_dir / "alpaca" / "alpaca_eval.jsonl").open()}
    kinds = {"summarize": sum(t.startswith("Summarize: ") for t in texts), "math": sum(t in gsm for t in texts),
             "qa": sum(t in csqa for t in texts), "chat": sum(t in alpaca for t in texts)}
    assert kinds == {k: round(100 * share) for k, share in MIX.items()} and len(set(texts)) == 100
    with pytest.raises(ValueError, match="805"):  # more prompts than AlpacaEval can feed
        prompt_mix(1400, data_dir)


@pytest.mark.filterwarnings("ignore:Detected call of")  # stepped by hand to read its lr
def test_the_official_schedule_is_transformers_linear_warmup_and_decay():
    from transformers import get_linear_schedule_with_warmup
    rc = RECIPES["official"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=rc["lr"])
    ref = get_linear_schedule_with_warmup(opt, rc["warmup"], rc["total"])
    ours = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=rc["lr"])
    for step in [*range(5), 1999, 2000, 2001, 400_000, 799_999, 800_000]:
        ref.last_epoch = step - 1
        ref.step()  # the lr transformers' scheduler gives at `step`
        linear_lr(ours, rc["lr"], step, rc["warmup"], rc["total"])
        assert ours.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18), step


@pytest.mark.parametrize("fmt", ["model.safetensors", "pytorch_model.bin"])
def test_an_official_adapter_checkpoint_drafts_as_the_same_weights_loaded_natively(llama_dir, tmp_path, fmt):
    from skip.kangaroo_official import convert_official
    from weights.kangaroo_official import KEYS, OfficialAdapterError
    m = tiny(llama_dir, 0.3)
    native = random_adapter(m, 2, seed=4, lens_like=False)
    ours_to_official = {v: k for k, v in KEYS.items()}
    official = {ours_to_official[k]: v.clone() for k, v in native.state_dict().items() if k != "frequent"}
    (tmp_path / "ck").mkdir()
    if fmt.endswith(".safetensors"):
        save_file(official, str(tmp_path / "ck" / fmt))
    else:
        torch.save(official, tmp_path / "ck" / fmt)
    convert_official(tmp_path / "ck", m, 2, tmp_path / "ours")
    loaded = load_adapter(tmp_path / "ours", m)
    ref = generate_kangaroo(m, PROMPT, native, max_new_tokens=16, eos=[])
    out = generate_kangaroo(m, PROMPT, loaded, max_new_tokens=16, eos=[])
    assert out.tokens == ref.tokens and [(r.drafted, r.accepted) for r in out.rounds] == \
        [(r.drafted, r.accepted) for r in ref.rounds]
    save_file({**official, "lm_head.weight": torch.zeros(3, 3)}, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(OfficialAdapterError, match=r"unexpected \['lm_head.weight'\]"):
        convert_official(tmp_path / "ck", m, 2, tmp_path / "other")
