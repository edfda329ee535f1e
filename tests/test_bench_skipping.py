"""The layer-skipping benchmark's paired comparison: the bootstrap interval against the exact
bootstrap distribution (all n^n resamples), and which rows Unified is paired with."""
import itertools

import numpy as np
import pytest

from skip.harness.bench_skipping import main, paired_bootstrap, paired_table, unified_leads


def test_bootstrap_interval_matches_exact_enumeration():
    a, b = [3.0, 2.0, 5.0, 11.0], [3.0, 1.0, 3.0, 1.0]  # differences 0, 1, 2, 10
    d = np.subtract(a, b)
    exact = np.sort([np.mean(c) for c in itertools.product(d, repeat=len(d))])  # 256 equally likely
    # 0.025 and 0.975 fall inside steps of the exact distribution, well clear of its jumps
    low, high = exact[int(0.025 * len(exact))], exact[int(0.975 * len(exact))]
    got = paired_bootstrap(a, b, resamples=20000)
    assert (got["low"], got["high"]) == (low, high) == (0.5, 7.75)
    assert got["mean"] == 3.25 and got["higher"] == 3 and got["n"] == 4
    assert paired_bootstrap(a, b, resamples=20000) == got  # seeded


def test_unified_is_paired_with_its_own_target_and_the_full_model():
    def row(name, r, tuned, scores):
        label = name if name == "full" else f"{name} {r}x" + (" (fine-tuned)" if tuned else "")
        return {"method": label, "name": name, "r": r, "fine_tuned": tuned, "rougeL_per_prompt": scores}
    rows = [row("full", 1, False, [9, 9]), row("early exit", 2, False, [1, 2]), row("unified", 2, False, [0, 0]),
            row("unified", 2, True, [3, 4]), row("skipdecode", 3, False, [5, 5]), row("unified", 3, False, [6, 4])]
    pairs = {(p["r"], p["unified"], p["against"]): p["mean"] for p in unified_leads(rows)}
    assert pairs == {(2, "unified 2x (fine-tuned)", "full"): -5.5, (2, "unified 2x (fine-tuned)", "early exit 2x"): 2.0,
                     (2, "unified 2x (fine-tuned)", "unified 2x"): 3.5,
                     (3, "unified 3x", "full"): -4.0, (3, "unified 3x", "skipdecode 3x"): 0.0}
    assert paired_table(unified_leads(rows)).count("\n") == 2 + len(pairs) - 1


def test_one_summary_is_refused():
    with pytest.raises(SystemExit):
        main(["--n-quality", "1"])


def test_a_throughput_run_without_a_token_fed_back_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--tok-new", "1"])
    assert "--tok-new must be at least 2" in capsys.readouterr().err
