"""Strict loading: every problem named in one clear error; configs mapped or refused."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import LoadError, UnsupportedConfig, from_hf, load_model

from conftest import VARIANTS, build_hf


def copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(llama_dir, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
        t["model.layers.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(LoadError) as e:
        load_model(copy_with(llama_dir, tmp_path / "bad", edit))
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.0.extra.weight" in msg
    assert "wrong shape (1): model.layers.0.self_attn.q_proj.weight: checkpoint (3, 3), model (64, 64)" in msg


def test_pickle_checkpoints_are_refused(llama_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(llama_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(LoadError, match=r"only pickle checkpoints \(pytorch_model.bin\).*never unpickles.*safetensors"):
        load_model(d)


@pytest.mark.parametrize("field,value,needle", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("model_type", "gpt2", "model_type='gpt2'"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type='dynamic'"),
])
def test_unsupported_llama_config_values_are_named(llama_dir, field, value, needle):
    c = json.loads((llama_dir / "config.json").read_text())
    c.pop("rope_parameters", None)
    c[field] = value
    with pytest.raises(UnsupportedConfig, match=f"unsupported config value {needle}".replace("(", r"\(")):
        from_hf(c)


def test_unsupported_opt_activation_is_named():
    with pytest.raises(UnsupportedConfig, match="activation_function='gelu'"):
        from_hf({"model_type": "opt", "activation_function": "gelu"})


def test_every_config_field_is_mapped():
    c = from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 32,
                 "rms_norm_eps": 1e-6, "rope_theta": 5e5, "tie_word_embeddings": True, "eos_token_id": [3, 4],
                 "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (c.n_kv_heads, c.head_dim, c.norm_eps, c.rope_theta, c.rope_type, c.rope_factor) == (
        2, 16, 1e-6, 5e5, "linear", 2.0)
    assert c.tie_embeddings and c.eos_token_id == [3, 4]
    o = from_hf({"model_type": "opt", "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "ffn_dim": 32, "do_layer_norm_before": False,
                 "word_embed_proj_dim": 32, "enable_bias": False, "layer_norm_elementwise_affine": False})
    assert (o.pre_norm, o.final_norm, o.embed_dim, o.attn_bias, o.mlp_bias, o.norm_affine, o.pos_offset) == (
        False, False, 32, False, False, False, 2)


def test_sharded_checkpoint_loads_the_same(tmp_path):
    hf = build_hf(*VARIANTS["opt_pre"])
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert (load_model(tmp_path)(ids) - hf(ids).logits).abs().max() <= 1e-5


@torch.no_grad()
def test_half_precision_loads_and_bad_dtype_is_refused(llama_dir):
    ids = torch.randint(0, 97, (1, 9))
    ref = load_model(llama_dir)(ids)
    for dtype in ("bfloat16", "float16"):
        m = load_model(llama_dir, dtype=dtype)
        assert m.head.weight.dtype == getattr(torch, dtype)
        assert (m(ids).float() - ref).abs().max() < 0.1 * ref.abs().max()
    with pytest.raises(LoadError, match="dtype 'int8' not supported"):
        load_model(llama_dir, dtype="int8")


@torch.no_grad()
def test_stored_precision_is_read_exactly_in_chunks_and_in_place(llama_dir, tmp_path, monkeypatch):
    import model.loader
    bf16 = copy_with(llama_dir, tmp_path / "bf16", lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    stored = load_file(bf16 / "model.safetensors")
    monkeypatch.setattr(model.loader, "CHUNK", 64)  # many chunks per tensor, and a last partial one
    for dtype in ("bfloat16", "float32"):
        m = load_model(bf16, dtype=dtype)
        for name, t in m.state_dict().items():
            ref = stored[model.loader.hf_name("llama", name)]
            assert t.dtype == getattr(torch, dtype) and torch.equal(t, ref.to(t.dtype)), name
    ref = load_model(llama_dir)  # fp32 in place, cast to bf16 through the chunks: the same as a cast
    m = load_model(llama_dir, dtype="bfloat16")
    assert all(torch.equal(a, b.bfloat16()) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))


@torch.no_grad()
def test_opt_checkpoint_saved_from_the_base_model_loads(tmp_path):
    hf = build_hf(*VARIANTS["opt_pre"])  # OPT ties its head: the base model's tensors are all there is
    tmp_path.joinpath("config.json").write_text(json.dumps(hf.config.to_dict()))
    save_file({k: v.contiguous() for k, v in hf.model.state_dict().items()}, tmp_path / "model.safetensors")
    ids = torch.randint(0, 97, (1, 9))
    assert (load_model(tmp_path)(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_loading_needs_the_weights_plus_one_chunk_not_an_fp32_copy(smollm2_dir):
    from skip.harness.bench_decoder import load_memory
    for dtype in ("float32", "bfloat16"):  # an fp32 build cast to bf16 would need 3x the bf16 weights
        assert load_memory(smollm2_dir, dtype)["peak_over_weights"] <= 1.3
