"""Routed matrix products: every route is the same product, the model takes them by a fixed rule,
and tuning (a benchmark's choice) only picks among them, on that model alone."""
import pytest
import torch
import torch.nn.functional as F

from model import load_model
from model import products
from model.decoder import Linear
from skip.harness.tune import set_routes, tune_products


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16])
def test_every_route_computes_x_times_w_transposed(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(2, rows, 64, generator=g)[:1]  # (1, rows, in), a view
    ref = F.linear(x, w, b)
    for route in products.PRODUCTS:
        if route == "dup" and rows != 1:
            continue
        y = products.PRODUCTS[route](x.reshape(rows, -1), w)
        torch.testing.assert_close(y, ref[0] - b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(products.linear(x, w, b), ref, rtol=1e-5, atol=1e-5)


def test_the_fixed_rule():
    w, small = torch.zeros(256, 256), torch.zeros(255, 256)
    for vendor, one in (("AuthenticAMD", "dup"), ("GenuineIntel", "linear"), ("", "linear")):
        assert [products.route(n, w, vendor) for n in (1, 2, 8, 9)] == [one, "transposed", "transposed", "linear"]
        assert [products.route(n, small, vendor) for n in (1, 2, 8, 9)] == ["linear"] * 4
        assert products.route(1, w.bfloat16(), vendor) == products.route(1, w.half(), vendor) == "linear"
    assert products.route(1, w) == products.route(1, w, products.cpu_vendor())  # this machine's, every call


@torch.no_grad()
def test_tuning_keeps_the_fastest_route_per_row_count_and_leaves_the_output(llama_dir):
    model, other = load_model(llama_dir), load_model(llama_dir)
    ids = torch.randint(0, 97, (1, 5))
    before = model(ids)
    res = tune_products(model, rows=range(1, 6), reps=2, ctx=8)
    shapes = {(*m.weight.shape, m.weight.dtype) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    tables = {id(m.routes) for m in model.modules() if isinstance(m, Linear)}
    assert len(tables) == 1  # one table, set on every Linear of the tuned model
    table = next(m.routes for m in model.modules() if isinstance(m, Linear))
    assert set(table) == {(n, *s) for n in range(1, 6) for s in shapes} and set(res) == set(range(1, 6))
    for n, (route, ms) in res.items():
        assert ms[route] == min(ms.values()) and set(ms) == set(products.PRODUCTS) - ({"dup"} if n > 1 else set())
        assert all(table[(n, *s)] == route for s in shapes)
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    assert all(m.routes is None for m in other.modules() if isinstance(m, Linear))  # no process-wide state
    set_routes(model, None)
    assert torch.equal(model(ids), other(ids))  # back on the rule: bit for bit the untuned model
