"""Fine-tuning with a skip pattern on a tiny model, and checkpoints that round-trip."""
import pytest
import torch

from model import load_model, save_model
from skip.finetune import finetune, response_layer_sets, response_loss


@pytest.mark.parametrize("method", ["unified", "skipdecode"])
def test_fine_tuning_lowers_the_loss_and_freezes_embeddings(llama_dir, method):
    model = load_model(llama_dir)
    embed = model.embed.weight.clone()
    pairs = [([5, 6, 7, 8], [9, 10, 11, 12, 13, 14])]
    layer_sets = response_layer_sets(method, model.cfg.n_layers, 2)
    with torch.no_grad():
        before = response_loss(model, *pairs[0], layer_sets).item()
    losses = finetune(model, pairs, layer_sets, steps=8, lr=1e-3, warmup=1)
    with torch.no_grad():
        after = response_loss(model, *pairs[0], layer_sets).item()
    assert losses[0] == pytest.approx(before, rel=1e-5) and after < before
    assert torch.equal(model.embed.weight, embed)


def test_checkpoint_round_trips(llama_dir, tmp_path):
    model = load_model(llama_dir)
    with torch.no_grad():
        model.blocks[1].mlp.up.weight.add_(0.5)
    save_model(model, tmp_path / "ck", llama_dir)
    again = load_model(tmp_path / "ck")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown method 'early'"):
        response_layer_sets("early", 30, 2)
