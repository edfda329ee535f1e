"""Official Kangaroo adapters compute as the official code does, which is not as the model does:
kangaroo/adapter.py builds A's RoPE with base 10000 and no scaling whatever the model's, and its
RMSNorm with the eps of A's own config.json. The oracle is transformers' own modules
(LlamaRMSNorm, LlamaAttention, LlamaRotaryEmbedding: the official AdapterModel is their copy) and
the HF model itself, on tiny Llamas whose RoPE is not base 10000 unscaled."""
import json

import pytest
import torch
from safetensors.torch import save_file

from model import attention_mask, load_model
from skip.kangaroo import adapt, generate_kangaroo
from skip.kangaroo_adapter import Adapter, AdapterError
from skip.kangaroo_files import load_adapter, save_adapter
from skip.kangaroo_official import convert_official, main as official_main
from weights.kangaroo_official import OfficialAdapterError

from conftest import LLAMA, build_hf, random_adapter

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding  # noqa: E402

L_EXIT, PROMPT = 2, [5, 6, 7, 8, 9, 10]
MODELS = {  # neither is base 10000 unscaled; the deep layers are shrunk so that drafts get accepted
    "theta_1e5": dict(LLAMA, num_key_value_heads=2, rope_theta=100000.0),
    "rope_linear": dict(LLAMA, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
}
OFFICIAL = {"rope_theta": 10000.0, "rope_type": "default"}  # what kangaroo/adapter.py computes with


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    """(transformers model, its config kwargs, our model loaded from its safetensors, their folder)."""
    kw = MODELS[request.param]
    hf = build_hf("llama", kw)
    with torch.no_grad():
        for layer in hf.model.layers[L_EXIT:]:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, kw, load_model(path), path


def official_state(seed, dim, kv_dim):
    """A random adapter in the official checkpoint's layout (AdapterModel's state dict)."""
    g = torch.Generator().manual_seed(seed)
    w = {p: (dim if p in "qo" else kv_dim) for p in "qkvo"}
    state = {f"layers.0.self_attn.{p}_proj.weight": torch.randn(w[p], dim, generator=g) * 0.15 for p in "qkv"}
    state["layers.0.self_attn.o_proj.weight"] = torch.randn(dim, dim, generator=g) * 0.1  # drafts near the lens
    state["layers.0.input_layernorm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    state["norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    return state


def hf_adapter(state, kw, eps, rope=None):
    """The official AdapterModel from transformers' modules, with RoPE `rope` (kw's own when None,
    else base rope_theta unscaled) and RMSNorm eps: a function of h (1, T, d), slots 0..T-1."""
    if rope is not None:  # as kangaroo/adapter.py: LlamaRotaryEmbedding(head_dim, max_len, base=10000)
        kw = {**{k: v for k, v in kw.items() if k not in ("rope_theta", "rope_scaling")}, "rope_theta": rope}
    c = transformers.LlamaConfig(**{**kw, "rms_norm_eps": eps}, attn_implementation="eager")
    attn, rot = LlamaAttention(c, 0).eval(), LlamaRotaryEmbedding(c)
    norm_in, norm = LlamaRMSNorm(c.hidden_size, eps), LlamaRMSNorm(c.hidden_size, eps)
    with torch.no_grad():
        for p in "qkvo":
            getattr(attn, f"{p}_proj").weight.copy_(state[f"layers.0.self_attn.{p}_proj.weight"])
        norm_in.weight.copy_(state["layers.0.input_layernorm.weight"])
        norm.weight.copy_(state["norm.weight"])

    @torch.no_grad()
    def forward(h):
        T = h.shape[1]
        causal = torch.full((T, T), float("-inf")).triu(1)[None, None]  # (1, 1, T, T)
        a, _ = attn(norm_in(h), rot(h, torch.arange(T)[None]), causal)
        return norm(h + a)
    return forward


def as_official(adapter):
    """Our adapter's weights under the official names, read off its modules (not our key table)."""
    s = {f"layers.0.self_attn.{p}_proj.weight": getattr(adapter.attn, f"w{p}").weight.detach() for p in "qkvo"}
    return {**s, "layers.0.input_layernorm.weight": adapter.norm_in.weight.detach(),
            "norm.weight": adapter.norm_out.weight.detach()}


def with_own(a, own):
    """Adapter a's weights, computing with the settings own."""
    b = Adapter(a.cfg, a.l, own)
    b.frequent = a.frequent
    b.load_state_dict(a.state_dict())
    return b.eval()


@torch.no_grad()
def ours(model, A, h):
    return adapt(model, A, h, A.new_cache(1, h.shape[1]), 0)


@torch.no_grad()
def hf_rounds(hf, A, prompt, n_new, gamma, eta):
    """Greedy Kangaroo rounds recomputed from scratch with transformers: every draft runs the HF
    model's first l layers and the adapter A over the whole sequence, then the HF head; every
    verification runs the HF model. Returns the tokens and each round's drafts."""
    def exited(seq):
        return hf(torch.tensor([seq]), output_hidden_states=True).hidden_states[L_EXIT]  # after l layers

    tokens, rounds = [int(hf(torch.tensor([prompt])).logits[0, -1].argmax())], []
    while len(tokens) < n_new:
        k, seq, drafts, conf = min(gamma, n_new - len(tokens) - 1), prompt + tokens, [], 1.0
        while len(drafts) < k and conf >= eta:  # the second exit: stop after a draft below eta
            p = hf.lm_head(A(exited(seq + drafts))[0, -1]).softmax(-1)
            drafts.append(int(p.argmax()))
            conf = float(p.max())
        target = hf(torch.tensor([seq + drafts])).logits[0, len(seq) - 1:].argmax(-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == target[a]:
            a += 1
        rounds.append(drafts)
        tokens += drafts[:a] + [target[a]]
    return tokens, rounds


def test_the_official_settings_compute_as_transformers_modules_at_base_10000(pair):
    _, kw, m, _ = pair
    torch.manual_seed(0)
    h = torch.randn(1, 24, m.cfg.dim) * 0.003  # mean(h^2) near eps, so a wrong eps shows too
    a = random_adapter(m, L_EXIT, 1, lens_like=False)
    ref = hf_adapter(as_official(a), kw, 1e-6, rope=10000.0)(h)
    assert (ours(m, with_own(a, {**OFFICIAL, "norm_eps": 1e-6}), h) - ref).abs().max() < 1e-5
    # each setting matters: the model's RoPE, or the model's eps (1e-5), is visibly another adapter
    for own in ({"norm_eps": 1e-6}, OFFICIAL):
        assert (ours(m, with_own(a, own), h) - ref).abs().max() > 1e-2, own


def test_an_adapter_trained_here_keeps_the_models_rope_bit_for_bit(pair, tmp_path):
    _, kw, m, _ = pair
    torch.manual_seed(0)
    h = torch.randn(1, 24, m.cfg.dim)
    save_adapter(random_adapter(m, L_EXIT, 1, lens_like=False), tmp_path / "a", steps=1)
    assert "own_config" not in json.loads((tmp_path / "a" / "adapter.json").read_text())
    a = load_adapter(tmp_path / "a", m)
    assert a.own == {} and a.inv_freq is None
    T = h.shape[1]
    before = a(h, m.rope(torch.arange(T)[None]), a.new_cache(1, T), 0, attention_mask(None, 0, T), m.attn_impl)
    assert torch.equal(ours(m, a, h), before)  # the model's RoPE, as before adapters had settings
    ref = hf_adapter(as_official(a), kw, m.cfg.norm_eps)(h)  # transformers at the model's own RoPE
    assert (before - ref).abs().max() < 1e-5
    assert (before - hf_adapter(as_official(a), kw, m.cfg.norm_eps, rope=10000.0)(h)).abs().max() > 1e-2


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_a_converted_official_adapter_drafts_as_transformers_at_base_10000(pair, tmp_path, eta):
    hf, kw, m, _ = pair
    state = official_state(5, m.cfg.dim, m.cfg.n_kv_heads * m.cfg.head_dim)
    (tmp_path / "ck").mkdir()
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    # the adapter's own config: the model's, one layer; the official code reads its eps, not its RoPE
    cfg = {**kw, "num_hidden_layers": 1, "model_type": "llama"}
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    convert_official(tmp_path / "ck", m, L_EXIT, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter.json").read_text())["own_config"] == \
        {**OFFICIAL, "norm_eps": kw["rms_norm_eps"]}
    a = load_adapter(tmp_path / "ours", m)
    n, gamma = 24, 4
    out = generate_kangaroo(m, PROMPT, a, max_new_tokens=n, gamma=gamma, eta=eta, eos=[])
    tokens, rounds = hf_rounds(hf, hf_adapter(state, kw, kw["rms_norm_eps"], rope=10000.0), PROMPT, n, gamma, eta)
    assert out.tokens == tokens and [r.drafts for r in out.rounds] == rounds
    assert any(r.accepted == r.drafted > 0 for r in out.rounds)  # A then reads two states at once
    # and the model's RoPE drafts otherwise: the same weights without the official settings
    wrong = generate_kangaroo(m, PROMPT, with_own(a, None), max_new_tokens=n, gamma=gamma, eta=eta, eos=[])
    assert wrong.tokens == tokens and [r.drafts for r in wrong.rounds] != rounds
    _, model_rope = hf_rounds(hf, hf_adapter(state, kw, kw["rms_norm_eps"]), PROMPT, n, gamma, eta)
    assert [r.drafts for r in wrong.rounds] == model_rope


def test_the_committed_adapter_keeps_the_models_rope(smollm2):
    from skip import WEIGHTS
    m, _ = smollm2
    a = load_adapter(WEIGHTS / "kangaroo-l2", m)
    assert a.own == {} and a.inv_freq is None
    torch.manual_seed(0)
    h, T = torch.randn(1, 9, m.cfg.dim), 9
    before = a(h, m.rope(torch.arange(T)[None]), a.new_cache(1, T), 0, attention_mask(None, 0, T), m.attn_impl)
    assert torch.equal(ours(m, a, h), before)


def test_the_command_records_what_the_adapters_own_config_says(pair, tmp_path, capsys):
    _, _, m, path = pair
    ck = tmp_path / "ck"
    ck.mkdir()
    state = official_state(5, m.cfg.dim, m.cfg.n_kv_heads * m.cfg.head_dim)
    save_file(state, str(ck / "model.safetensors"))
    adapter_cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1}

    def convert(src, out, **cfg):
        (ck / "config.json").write_text(json.dumps({**adapter_cfg, **cfg}))
        official_main([str(src), "--l", "2", "--model", str(path), "--out", str(tmp_path / out)])
        return json.loads((tmp_path / out / "adapter.json").read_text())["own_config"]
    # the file or its folder; LlamaConfig's eps 1e-6 when the config has none, as the official code reads it
    assert convert(ck / "model.safetensors", "a", rms_norm_eps=1e-5) == {**OFFICIAL, "norm_eps": 1e-5}
    assert convert(ck, "b") == {**OFFICIAL, "norm_eps": 1e-6}
    assert "rope_theta': 10000.0" in capsys.readouterr().out
    a = load_adapter(tmp_path / "b", m)
    assert a.own == {**OFFICIAL, "norm_eps": 1e-6} and a.norm_in.eps == a.norm_out.eps == 1e-6
    (ck / "config.json").unlink()  # no config: the model's eps
    convert_official(ck, m, L_EXIT, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter.json").read_text())["own_config"] == OFFICIAL
    for cfg, named in [({"num_attention_heads": 8}, "num_attention_heads 8 \\(model: 4\\)"),
                       ({"num_key_value_heads": None}, "num_key_value_heads 4 \\(model: 2\\)")]:
        with pytest.raises(SystemExit):
            convert(ck, "d", **cfg)
        assert "another head layout" in capsys.readouterr().err
        (ck / "config.json").write_text(json.dumps({**adapter_cfg, **cfg}))
        with pytest.raises(OfficialAdapterError, match=named):
            convert_official(ck, m, L_EXIT, tmp_path / "d")


def test_bad_own_settings_are_refused(pair, tmp_path):
    _, _, m, _ = pair
    save_adapter(random_adapter(m, L_EXIT, 1, lens_like=False), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    for own, named in [({"rope_base": 1.0}, "own settings"), ({"rope_type": "yarn"}, "own settings"),
                       ({"rope_theta": -1.0}, "rope_theta"), ({"norm_eps": "1e-6"}, "norm_eps"),
                       ([10000.0], "must be an object")]:
        (tmp_path / "a" / "adapter.json").write_text(json.dumps({**meta, "own_config": own}))
        with pytest.raises(AdapterError, match=named):
            load_adapter(tmp_path / "a", m)


def test_a_model_with_attention_bias_has_no_official_adapter(tmp_path):
    from conftest import VARIANTS
    build_hf(*VARIANTS["llama_bias"]).save_pretrained(tmp_path / "m", safe_serialization=True)
    m = load_model(tmp_path / "m")  # kangaroo/adapter.py's projections never have a bias
    (tmp_path / "ck").mkdir()
    save_file(official_state(5, m.cfg.dim, m.cfg.n_kv_heads * m.cfg.head_dim), str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(OfficialAdapterError, match=r"does not fit this model: \['attn.wk.bias'"):
        convert_official(tmp_path / "ck", m, L_EXIT, tmp_path / "ours")
