"""The Llama-shaped families beside Llama: Qwen2 (biases on q, k, v), Qwen3 (RMSNorm on each
head's q and k; here with biases and a sliding window on its last two layers) and Mistral (a
sliding window on every layer), windows shorter than the prompts plus their tokens. The decoder
tests run them as golden variants (tests/conftest.py VARIANTS); here every method runs on each
against its oracle, as on Llama: the cache-free reference, the rows' unbatched runs, plain greedy
decoding, transformers' trace."""
import json
from dataclasses import replace

import pytest
import torch

from model import Decoder, generate, layer_window, load_model
from skip.kangaroo_adapter import Adapter
from skip.kangaroo_files import save_adapter
from skip.train.kangaroo import exit_states, self_distill, train
from skip.trace.check import read
from skip.trace.compare import compare
from skip.trace.methods import trace
from skip.trace.port import write_transformers_trace
from skip.adainfer import Threshold
from skip.adainfer_gen import generate_adainfer
from skip.baselines import generate_skipdecode, skipdecode_layers, skipdecode_schedule
from skip.unified import generate_unified, kept_layers

from conftest import VARIANTS, build_hf, build_pair, reference_decode
from test_exits_batch import PROMPTS, check_adainfer, check_early_exit
from test_kangaroo_batch import same_as_alone

FAMILIES = ["qwen2", "qwen3_window", "mistral_window"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    hf, model = build_pair(request.param, tmp_path_factory)
    return request.param, hf, model


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen3_window", "mistral_window"])
def test_a_window_changes_exactly_the_positions_past_it(name, tmp_path_factory):
    _, m = build_pair(name, tmp_path_factory)
    full = Decoder(replace(m.cfg, sliding_window=None, sliding_layers=[])).eval()
    full.load_state_dict(m.state_dict())
    ids = torch.randint(3, m.cfg.vocab_size, (1, 3 * m.cfg.sliding_window), generator=torch.Generator().manual_seed(0))
    ours, theirs = m(ids)[0], full(ids)[0]  # (T, V)
    W = m.cfg.sliding_window
    assert torch.equal(ours[:W], theirs[:W])  # every key inside the window
    assert all((ours[t] - theirs[t]).abs().max() > 1e-3 for t in range(W, 3 * W))


@torch.no_grad()
def test_layer_skipping_and_the_exits_equal_their_oracles(family):
    _, _, model = family
    L, K = model.cfg.n_layers, kept_layers(model.cfg.n_layers, 2, False)
    assert generate_unified(model, PROMPTS, 2, max_new_tokens=10, eos=[]) == \
        reference_decode(model, PROMPTS, lambda i: K, 10)
    schedule = skipdecode_schedule(L, 2, 10)
    assert generate_skipdecode(model, PROMPTS, 2, max_new_tokens=10, eos=[]) == \
        reference_decode(model, PROMPTS, lambda i: skipdecode_layers(L, schedule, i), 10)
    check_early_exit(model)  # batched rows equal their unbatched runs, those the cache-free reference
    check_adainfer(model)


def test_a_trained_adapter_decodes_losslessly_and_its_rows_equal_their_runs_alone(family):
    _, _, model = family
    adapter = Adapter.from_model(model, 2)
    seqs = self_distill(model, PROMPTS, 12)
    before = [p.detach().clone() for p in adapter.parameters()]
    train(model, adapter, exit_states(model, seqs, 2), seqs, list(range(len(seqs))), steps=3, batch=2)
    assert any(not torch.equal(a, b) for a, b in zip(before, adapter.parameters()))  # it trained
    plain = [generate(model, [p], max_new_tokens=12, eos=[])[0] for p in PROMPTS]
    holes = accepted = 0
    with torch.no_grad():
        for gamma, eta in [(3, 0.0), (6, 0.4)]:
            rows = same_as_alone(model, PROMPTS, adapter=adapter, max_new_tokens=12, gamma=gamma, eta=eta, eos=[])
            assert [r.tokens for r in rows] == plain
            holes += sum(r.holes for o in rows for r in o.rounds)
            accepted += sum(r.accepted for o in rows for r in o.rounds)
    assert holes > 0 and accepted > 0  # rows with holes, keys past the window (prompt + 12 > 6): both paths ran


def test_every_methods_trace_holds_its_run_and_transformers_trace_equals_ours(family, tmp_path, monkeypatch):
    name, hf, model = family
    prompt = PROMPTS[2]
    monkeypatch.setattr(model.cfg, "eos_token_id", [])  # the full length on both sides
    monkeypatch.setattr(hf.generation_config, "eos_token_id", None)
    trace(model, prompt, tmp_path / "full", "full", max_new_tokens=10)
    write_transformers_trace(hf, prompt, tmp_path / "hf", 10)
    assert compare(tmp_path / "hf", tmp_path / "full") == []
    save_adapter(Adapter.from_model(model, 2), tmp_path / "adapter")
    runs = {"unified": ({"r": 2}, generate_unified(model, [prompt], 2, max_new_tokens=10, eos=[])[0]),
            "skipdecode": ({"r": 2}, generate_skipdecode(model, [prompt], 2, max_new_tokens=10, eos=[])[0]),
            "adainfer": ({"tau": 0.5}, generate_adainfer(model, prompt, Threshold(0.5), 10, eos=[]).tokens),
            "kangaroo": ({"adapter": tmp_path / "adapter"}, None)}  # lossless: plain greedy's tokens
    plain = json.loads((tmp_path / "full" / "trace.json").read_text())["tokens"]
    for method, (settings, tokens) in runs.items():
        trace(model, prompt, tmp_path / method, method, max_new_tokens=10, settings=settings)
        meta, _ = read(tmp_path / method)  # a valid trace (skip/trace/check.py)
        assert meta["tokens"] == (tokens or plain), method


@pytest.mark.parametrize("kind, kw", [
    ("qwen2", {}), ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 4}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 3,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}),
    ("mistral", {"sliding_window": 5}), ("mistral", {"sliding_window": None})])
def test_each_layers_window_and_shape_are_the_ones_transformers_reads(kind, kw):
    """From a config.json as a hub model ships it (only what differs from the family's defaults,
    no layer_types unless given) and from transformers' full one."""
    import transformers
    from conftest import FAMILIES
    from model import from_hf
    given = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, **kw)
    hf_cfg = getattr(transformers, f"{FAMILIES[kind]}Config")(**given)
    hf = getattr(transformers, f"{FAMILIES[kind]}ForCausalLM")(hf_cfg)
    theirs = [layer.self_attn.sliding_window if hasattr(layer.self_attn, "sliding_window") else hf_cfg.sliding_window
              for layer in hf.model.layers]
    attn = hf.model.layers[0].self_attn
    for c in ({"model_type": kind, **given}, hf_cfg.to_dict()):
        ours = from_hf(c)
        assert [layer_window(ours, i) for i in range(ours.n_layers)] == theirs
        assert (ours.n_kv_heads, ours.head_dim) == (attn.k_proj.out_features // attn.head_dim, attn.head_dim)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_what_a_config_leaves_out_is_what_transformers_assumes(kind):
    import transformers
    from conftest import FAMILIES
    from model import from_hf
    given = dict(vocab_size=97, hidden_size=4096, intermediate_size=96, num_hidden_layers=2, num_attention_heads=32)
    hf = getattr(transformers, f"{FAMILIES[kind]}Config")(**given)
    ours = from_hf({"model_type": kind, **given})
    assert (ours.n_kv_heads, ours.head_dim, ours.sliding_window, ours.max_seq_len, ours.bos_token_id,
            ours.eos_token_id) == (hf.num_key_value_heads, getattr(hf, "head_dim", None) or 4096 // 32,
                                   hf.sliding_window, hf.max_position_embeddings, hf.bos_token_id,
                                   [] if hf.eos_token_id is None else [hf.eos_token_id])


@pytest.mark.parametrize("change, said", [
    ({"model_type": "qwen2_moe"}, "model_type"),
    ({"model_type": "qwen3", "use_sliding_window": True, "layer_types": ["chunked_attention"] * 4}, "layer_types"),
    ({"model_type": "qwen2", "layer_types": ["sliding_attention"] * 4}, "use_sliding_window"),
    ({"model_type": "qwen2", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window")])
def test_what_the_decoder_does_not_implement_is_refused_by_name(change, said):
    from conftest import LLAMA
    from model import UnsupportedConfig, from_hf
    with pytest.raises(UnsupportedConfig, match=said):
        from_hf({**LLAMA, "num_key_value_heads": 2, **change})


# ---------------------------------------------------------------- GGUF files of these families
GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # llama.cpp's tensor names


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permute of a llama Q or K projection (weight or bias)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, arch, path, scaling=None):
    """hf's tensors in F32 as llama.cpp writes an `arch` GGUF, with a vocabulary of placeholder
    tokens and Qwen2's pre-tokenizer (which the converter does not implement); scaling: (type,
    factor) of its RoPE scaling."""
    import gguf
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # Qwen2's config has none
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_context_length(c.max_position_embeddings)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(scaling[0]))
        w.add_rope_scaling_factor(scaling[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name in top:
            w.add_tensor(top[name], t.numpy())
            continue
        _, _, i, *module, kind = name.split(".")  # model.layers.i.<module>.weight|bias
        data = t.numpy()
        if arch == "llama" and module[-1] in ("q_proj", "k_proj"):
            data = llama_cpp_permute(data, c.num_attention_heads if module[-1] == "q_proj" else c.num_key_value_heads)
        w.add_tensor(f"blk.{i}.{GGUF_LAYER['.'.join(module)]}.{kind}", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@torch.no_grad()
@pytest.mark.parametrize("name, arch", [("qwen2", "qwen2"), ("qwen3_window", "qwen3"), ("mistral_window", "llama"),
                                        ("llama_rope_linear", "llama")])
def test_a_gguf_of_each_family_converts_to_the_tensors_it_came_from(name, arch, tmp_path):
    from safetensors.torch import load_file
    from weights.convert import DONE, convert
    hf = build_hf(*VARIANTS[name])
    rope = hf.config.rope_parameters
    write_gguf(hf, arch, tmp_path / "m.gguf", rope["rope_type"] != "default" and (rope["rope_type"], rope["factor"]))
    said = []
    convert(tmp_path / "m.gguf", tmp_path / "out", log=said.append)
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" or not hf.config.tie_word_embeddings}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    m = load_model(tmp_path / "out")
    assert m.cfg.qk_norm == (arch == "qwen3") and m.cfg.attn_bias == (arch != "llama")
    assert (m.cfg.rope_type, m.cfg.rope_factor) == (rope["rope_type"], rope.get("factor", 1.0))
    T = VARIANTS[name][1].get("sliding_window", 12)  # llama.cpp writes no window: logits within it
    ids = torch.randint(3, m.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    assert (m(ids) - hf(ids).logits).abs().max() <= 1e-5
    assert "no tokenizer files: pre-tokenizer 'qwen2' is not implemented" in said[-1]
    record = json.loads((tmp_path / "out" / DONE).read_text())
    assert record["tokenizer"].startswith("not converted") and not (tmp_path / "out" / "tokenizer.json").exists()


def test_a_gguf_whose_rope_scaling_changes_numbers_we_do_not_implement_is_refused(tmp_path):
    from weights.convert import ConvertError, convert
    write_gguf(build_hf(*VARIANTS["qwen2"]), "qwen2", tmp_path / "m.gguf", ("yarn", 4.0))
    with pytest.raises(ConvertError, match="rope scaling 'yarn'"):
        convert(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.5, 0.05])  # the share of the file left
def test_a_truncated_gguf_gives_a_clear_error_and_leaves_nothing_behind(tmp_path, keep):
    from weights.convert import ConvertError, convert
    write_gguf(build_hf(*VARIANTS["qwen2"]), "qwen2", tmp_path / "m.gguf")
    whole = (tmp_path / "m.gguf").read_bytes()
    bad, out = tmp_path / "broken.gguf", tmp_path / "out"
    bad.write_bytes(whole[:int(len(whole) * keep)])
    with pytest.raises(ConvertError, match="not a readable GGUF file"):
        convert(bad, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf", "m.gguf"]
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ConvertError, match="not a readable GGUF file"):
        convert(bad, out)
    assert not out.exists()


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen3_window", "mistral_window"])
def test_a_chunk_after_the_prefill_sees_its_window_as_transformers_does(name, tmp_path_factory):
    """Several tokens at once past the window (Kangaroo's verification), in a left-padded batch:
    their logits are transformers' for the whole sequences."""
    from model import KVCache, left_pad
    hf, m = build_pair(name, tmp_path_factory)
    W, g = m.cfg.sliding_window, torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, m.cfg.vocab_size, (n,), generator=g).tolist() for n in (3 * W, 2 * W + 1)]
    ids, mask = left_pad(seqs, 0)  # (B, S) and the real-token mask
    P, S = 2 * W, ids.shape[1]  # the prefill's slots, then one chunk of the rest
    cache = KVCache.for_model(m.cfg, 2, S)
    m(ids[:, :P], cache=cache, pad_mask=mask[:, :P])
    ours = m(ids[:, P:], cache=cache, start=P, pad_mask=mask)
    theirs = hf(ids, attention_mask=mask.long()).logits[:, P:]
    assert (ours - theirs)[mask[:, P:]].abs().max() <= 1e-4
