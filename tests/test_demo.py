"""`make demo`'s entry point on one prompt: a row per method, finite numbers, and Kangaroo
(lossless) agreeing with the full model everywhere."""
import math

from skip.harness import demo


def test_demo_table_has_every_method_and_kangaroo_is_lossless(smollm2_dir, data_dir):
    rows = demo.main(["--model", str(smollm2_dir), "--prompts", "2", "--max-new", "12"])
    assert [r["method"].split()[0] for r in rows] == ["full", "AdaInfer", "Kangaroo", "Unified"] * 2
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("layers_per_token", "flops_ratio", "wall_clock_ratio", "agreement"))
        if r["method"].startswith(("full", "Kangaroo")):
            assert r["agreement"] == 1.0
        if r["method"] == "full":
            assert r["flops_ratio"] == 1.0 and r["layers_per_token"] == 30
    assert "| Kangaroo" in demo.table(rows)
