"""Low-rank fine-tuning with a skip pattern (skip/train/lora.py) on a tiny model: it starts from the
base model exactly, trains only A and B, and the saved adapter merged into a fresh copy computes
what the trained, parametrized model computes."""
import json

import pytest
import torch

from model import load_model
from skip.train.finetune import finetune, response_layer_sets, response_loss
from skip.train.lora import LoRAError, attach, load_lora, save_lora
from skip.unified import generate_unified, kept_layers


def test_lora_trains_only_its_matrices_and_round_trips(llama_dir, tmp_path):
    torch.manual_seed(0)
    model, base = load_model(llama_dir), load_model(llama_dir)
    L = model.cfg.n_layers
    layer_sets = response_layer_sets("unified", L, 2)
    pair = ([5, 6, 7, 8], [9, 10, 11, 12, 13, 14])
    with torch.no_grad():
        before = response_loss(base, *pair, layer_sets).item()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    mods = attach(model, kept_layers(L, 2), rank=2)
    with torch.no_grad():  # B = 0: the adapted model is the base model, bit for bit
        assert response_loss(model, *pair, layer_sets).item() == before
    losses = finetune(model, [pair], layer_sets, steps=8, lr=1e-2, warmup=1,
                      params=[p for m in mods.values() for p in m.parameters()])
    assert losses[0] == pytest.approx(before, rel=1e-6) and losses[-1] < before
    originals = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in model.state_dict().items()
                 if not k.endswith((".A", ".B"))}
    assert all(torch.equal(originals[k], w) for k, w in weights.items())  # the base weights stayed frozen

    save_lora(mods, tmp_path / "ad", model, method="unified", r=2)
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["rank"] == 2 and meta["layers"] == kept_layers(L, 2)
    load_lora(tmp_path / "ad", base)
    with torch.no_grad():
        ids = torch.tensor([pair[0] + pair[1]])
        torch.testing.assert_close(base(ids), model(ids), rtol=1e-4, atol=1e-5)
        assert generate_unified(base, [pair[0]], 2, max_new_tokens=6) == generate_unified(model, [pair[0]], 2,
                                                                                        max_new_tokens=6)


def test_lora_of_another_model_is_refused(llama_dir, tmp_path):
    model = load_model(llama_dir)
    mods = attach(model, [0], rank=1)
    save_lora(mods, tmp_path / "ad", model)
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps({**meta, "dim": meta["dim"] + 1}))
    with pytest.raises(LoRAError, match="trained for another model: dim"):
        load_lora(tmp_path / "ad", load_model(llama_dir))


def test_a_refused_adapter_leaves_the_model_as_it_was(llama_dir, tmp_path):
    """Every field and tensor is checked, and every merged weight found finite, before the first
    weight changes; a refusal names what is wrong."""
    from safetensors.torch import load_file, save_file
    model = load_model(llama_dir)
    mods = attach(model, [0, 2], rank=2)
    with torch.no_grad():
        for m in mods.values():
            m.B.normal_()
    save_lora(mods, tmp_path / "ad", model)
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    tensors = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    fresh = load_model(llama_dir)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    late_nan = dict(tensors)
    late_nan["blocks.2.mlp.down.B"] = torch.full_like(tensors["blocks.2.mlp.down.B"], float("nan"))
    cases = [({"alpha": float("nan")}, None, "finite alpha"), ({"alpha": 1e308}, None, "non-finite weight"),
             ({"layers": [-1]}, None, "layers must be"), ({"layers": [True]}, None, "layers must be"),
             ({"layers": [99]}, None, "layers must be"), ({"layers": [0, 0]}, None, "layers must be"),
             ({"rank": 0}, None, "rank >= 1"), ({"rank": "2"}, None, "rank >= 1"), ({"layers": None}, None, "layers"),
             ({}, late_nan, "blocks.2.mlp.down .*non-finite"), ("list", None, "must be an object")]
    for i, (change, new_tensors, said) in enumerate(cases):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        save_file(new_tensors or tensors, str(d / "adapter.safetensors"))
        (d / "adapter.json").write_text(json.dumps([meta] if change == "list" else {**meta, **change}))
        with pytest.raises(LoRAError, match=said):
            load_lora(d, fresh)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()), change
    load_lora(tmp_path / "ad", fresh)  # the good one merges
    assert not torch.equal(fresh.blocks[2].mlp.down.weight, before["blocks.2.mlp.down.weight"])
