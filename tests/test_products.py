"""Routed matrix products: every route is the same product, and tuning only picks among them."""
import pytest
import torch
import torch.nn.functional as F

from model import load_model, tune_products
from model import products


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


@torch.no_grad()
def test_tuning_keeps_the_fastest_route_per_row_count_and_leaves_the_output(llama_dir, monkeypatch):
    monkeypatch.setattr(products, "ROUTES", {})
    model = load_model(llama_dir)
    ids = torch.randint(0, 97, (1, 5))
    before = model(ids)
    res = tune_products(model, rows=range(1, 6), reps=2, ctx=8)
    shapes = {(*m.weight.shape, m.weight.dtype) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert set(products.ROUTES) == {(n, *s) for n in range(1, 6) for s in shapes}
    for n, (route, ms) in res.items():
        assert ms[route] == min(ms.values()) and set(ms) == set(products.PRODUCTS) - ({"dup"} if n > 1 else set())
        assert all(products.ROUTES[(n, *s)] == route for s in shapes)
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
