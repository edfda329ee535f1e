"""The trace viewer's cells against what the method did: Unified's kept layers, SkipDecode's
schedule, AdaInfer's exits (from the method run directly), Kangaroo's rounds; the divergence it
boxes is the perturbed slot and layer; bad input is one line and status 2."""
import json
import shutil

import numpy as np
import pytest

from model import load_model
from skip.adainfer import Threshold
from skip.adainfer_gen import generate_adainfer
from skip.baselines import skipdecode_layer_sets
from skip.kangaroo import generate_kangaroo
from skip.kangaroo_files import load_adapter, save_adapter
from skip.trace.check import read
from skip.trace.format import TraceError
from skip.trace.methods import trace
from skip.trace.compare import compare, findings
from skip.trace.show import DRAFT, EXIT, FILLED, RAN, REJECTED, SKIPPED, VERIFIED, cells, divergence, show
from skip.unified import kept_layers

from conftest import VARIANTS, build_hf, random_adapter, trace_cli, trace_refused

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
T, L, N = len(PROMPT), 4, 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("show")
    build_hf(*VARIANTS["llama_gqa"]).save_pretrained(tmp / "model", safe_serialization=True)
    model = load_model(tmp / "model")
    model.cfg.eos_token_id = []  # run the full length
    save_adapter(random_adapter(model, 2, 0, lens_like=True), tmp / "adapter")  # l = 2
    return tmp, model


def grid_of(model, path, method, settings):
    trace(model, PROMPT, path, method, N, settings)
    meta = read(path)[0]
    return meta, cells(meta)


def expected(columns):
    """(L, 1 + len(columns)) states: the prompt column (every layer ran), then one per pass."""
    return np.array([[RAN] * L] + columns).T


def test_unified_runs_exactly_the_kept_layers_at_every_decode_slot(tiny, tmp_path):
    tmp, model = tiny
    meta, grid = grid_of(model, tmp_path / "u", "unified", {"r": 2})
    K = kept_layers(L, 2)
    assert 0 < len(K) < L
    assert (grid.states == expected([[RAN if i in K else SKIPPED for i in range(L)]] * (N - 1))).all()
    assert grid.slots == [None] + list(range(T, T + N - 1)) and grid.fed == [None] + meta["tokens"][:-1]


def test_skipdecode_runs_its_schedule(tiny, tmp_path):
    tmp, model = tiny
    _, grid = grid_of(model, tmp_path / "s", "skipdecode", {"r": 2})
    sets = skipdecode_layer_sets(L, 2, N - 1)
    assert all(0 < len(s) < L for s in sets)
    assert (grid.states == expected([[RAN if i in s else SKIPPED for i in range(L)] for s in sets])).all()


def test_adainfer_exits_where_the_method_exits_and_fills_above(tiny, tmp_path):
    tmp, model = tiny
    _, grid = grid_of(model, tmp_path / "a", "adainfer", {"tau": 0.08})
    exits = generate_adainfer(model, PROMPT, Threshold(0.08), N).exit_layers  # the oracle: the method itself
    assert any(e < L - 1 for e in exits) and any(e == L - 1 for e in exits)
    want = [[RAN] * e + [EXIT if e < L - 1 else RAN] + [FILLED] * (L - 1 - e) for e in exits]
    assert (grid.states == expected(want)).all()


@pytest.mark.parametrize("eta", [0.6, 0.0])  # eta 0: every round drafts gamma tokens
def test_kangaroo_columns_are_its_rounds_drafts_accepted_and_rejected(tiny, tmp_path, eta):
    tmp, model = tiny
    meta, grid = grid_of(model, tmp_path / "k", "kangaroo", {"adapter": str(tmp / "adapter"), "eta": eta})
    out = generate_kangaroo(model, PROMPT, load_adapter(tmp / "adapter", model), max_new_tokens=N, eta=eta)
    assert grid.l == 2 and len(grid.rounds) == len(out.rounds)
    assert sum(r.accepted for r in out.rounds) > 0 and sum(r.drafted - r.accepted for r in out.rounds) > 0
    for s, (cols, r) in enumerate(zip(grid.rounds, out.rounds)):
        kept = [c for c in cols if not (grid.states[:, c] == REJECTED).any()]
        rejected = [c for c in cols if (grid.states[:, c] == REJECTED).all()]
        assert (len(cols), len(kept) - 1, len(rejected)) == (r.drafted + 1, r.accepted, r.drafted - r.accepted)
        assert kept == cols[:r.accepted + 1] and [grid.fed[c] for c in cols[1:]] == r.drafts
        assert (grid.states[:, kept] == np.array([[DRAFT]] * 2 + [[VERIFIED]] * 2)).all()
        if s + 1 < len(grid.rounds):  # the next round starts at the first rejected slot: the layer runs say so
            assert grid.slots[grid.rounds[s + 1][0]] == grid.slots[cols[0]] + r.accepted + 1


def test_kangaroo_without_drafts_takes_l_from_the_adapter(tiny, tmp_path):
    tmp, model = tiny
    _, grid = grid_of(model, tmp_path / "k", "kangaroo", {"adapter": str(tmp / "adapter"), "gamma": 0})
    assert grid.l == 2 and all(len(cols) == 1 for cols in grid.rounds)
    assert (grid.states[:, 1:] == np.array([[DRAFT]] * 2 + [[VERIFIED]] * 2)).all()


def test_steps_that_disagree_with_the_layer_runs_are_refused(tiny, tmp_path):
    tmp, model = tiny
    meta, _ = grid_of(model, tmp_path / "k", "kangaroo", {"adapter": str(tmp / "adapter"), "eta": 0.0})
    for key, delta in (("drafted", -1), ("accepted", 1)):
        bad = json.loads(json.dumps(meta))
        bad["steps"][1][key] += delta
        with pytest.raises(TraceError, match="the layer runs disagree"):
            cells(bad)
    meta, _ = grid_of(model, tmp_path / "a", "adainfer", {"tau": 0.08})
    meta["steps"][0]["exit_layer"] = (meta["steps"][0]["exit_layer"] + 1) % L
    with pytest.raises(TraceError, match="the layer runs of slot 8 disagree"):
        cells(meta)


@pytest.mark.parametrize("method,settings,step,layer", [
    ("unified", {"r": 2}, 2, 3), ("adainfer", {"tau": 0.08}, 0, 0), ("kangaroo", {"eta": 0.0}, 3, 0),
    ("kangaroo", {"eta": 0.0}, 1, 1), ("kangaroo", {"eta": 0.0}, 3, 3), ("full", {}, 4, 2)])
def test_the_boxed_divergence_is_the_perturbed_slot_and_layer(tiny, tmp_path, method, settings, step, layer):
    tmp, model = tiny
    settings = {"adapter": str(tmp / "adapter"), **settings} if method == "kangaroo" else settings
    slot, block = T + step, model.blocks[layer]
    trace(model, PROMPT, tmp_path / "ref", method, N, settings)
    original = block.forward

    def perturbed(h, rope, mask, cache, i, start, impl):  # the state at slot 1% larger: its norm shows it
        out, a, m = original(h, rope, mask, cache, i, start, impl)
        if start <= slot < start + out.shape[1]:  # Kangaroo verifies a round's slots in one run
            out = out.clone()
            out[:, slot - start] *= 1.01
        return out, a, m
    block.forward = perturbed
    try:
        trace(model, PROMPT, tmp_path / "bad", method, N, settings)
    finally:
        del block.forward
    meta = read(tmp_path / "ref")[0]
    grid = cells(meta)
    first = next(f for f in findings(tmp_path / "ref", tmp_path / "bad") if f.run is not None)
    assert first.words in compare(tmp_path / "ref", tmp_path / "bad")
    assert f"slot {slot} (decode step {step}), layer {layer}:" in first.words
    c = grid.slots.index(slot)  # the first pass over that slot
    assert grid.states[layer, c] != SKIPPED and divergence(grid, meta, first) == (layer, c, c)


def test_show_draws_a_png_and_answers_bad_input_with_status_2(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tmp, model = tiny
    trace(model, PROMPT, tmp_path / "k", "kangaroo", N, {"adapter": str(tmp / "adapter")})
    shutil.copytree(tmp_path / "k", tmp_path / "k2")
    meta = json.loads((tmp_path / "k2" / "trace.json").read_text())
    meta["tokens"][3] += 1
    (tmp_path / "k2" / "trace.json").write_text(json.dumps(meta))
    assert show(tmp_path / "k", tmp_path / "k2") == tmp_path / "k" / "trace.png"
    assert (tmp_path / "k" / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    del meta["layer_runs"]  # a port's trace: drawn from its steps
    (tmp_path / "k2" / "trace.json").write_text(json.dumps(meta))
    assert trace_cli(capsys, "show", tmp_path / "k2")[0] == 0
    assert (tmp_path / "k2" / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for st in meta["steps"]:  # and one whose steps do not say what ran: nothing to draw
        del st["drafted"]
    (tmp_path / "k2" / "trace.json").write_text(json.dumps(meta))
    for bad in (tmp_path / "k2", tmp_path / "missing"):
        trace_refused(capsys, "show", bad)
