"""Fine-tuning with a skip pattern on a tiny model, and checkpoints that round-trip."""
import pytest
import torch

from model import load_model, save_model
from skip.train.finetune import MixedPrecision, finetune, response_layer_sets, response_loss


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_trains_fp32_master_weights(dtype):
    """An AdamW step of lr 3e-5 is below a half-precision weight's resolution: the master copies
    take it (each moves by about lr per step), the model's weights are the masters rounded, and
    the gradients the masters get are the model's own (fp16: scaled for the backward, unscaled)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).to(dtype)
    x = torch.randn(4, 16).to(dtype)
    mp = MixedPrecision(lin.parameters(), dtype)
    start = [m.detach().clone() for m in mp.master]
    opt = torch.optim.AdamW(mp.master, lr=3e-5, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = lin(x).float().pow(2).mean()
        want = torch.autograd.grad(loss, list(lin.parameters()), retain_graph=True)
        assert mp.backward(loss)
        for m, g in zip(mp.master, want):
            torch.testing.assert_close(m.grad, g.float(), rtol=1e-2, atol=1e-6)
        opt.step()
        mp.copy_back()
    for m, s, p in zip(mp.master, start, lin.parameters()):
        assert torch.equal(p, m.to(dtype)) and p.grad is None
        assert float((m - s).detach().abs().mean()) == pytest.approx(3 * 3e-5, rel=0.2)
    opt.zero_grad(set_to_none=True)
    step = mp.backward(lin(x).float().sum() * float("inf"))
    assert step is (dtype == torch.bfloat16)  # a non-finite fp16 step is skipped
