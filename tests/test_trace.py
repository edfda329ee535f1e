"""The trace format: our decoder's trace against one written from transformers' hidden states,
a perturbation found at exactly its layer, and clear errors on bad files."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model
from skip.trace import TraceError, trace
from skip.trace_compare import compare
from skip.trace_port import write_transformers_trace

from conftest import VARIANTS, build_hf

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traces")
    hf = build_hf(*VARIANTS["llama_gqa"])
    hf.save_pretrained(tmp / "model", safe_serialization=True)
    ours = load_model(tmp / "model")
    ours.cfg.eos_token_id = []  # run the full length, as hf_trace does
    trace(ours, PROMPT, tmp / "ours", "full", max_new_tokens=12)
    hf.generation_config.eos_token_id = None  # run the full length
    write_transformers_trace(hf, PROMPT, tmp / "hf", 12)
    return tmp, ours


def test_our_trace_equals_the_transformers_trace(traces):
    tmp, _ = traces
    assert compare(tmp / "hf", tmp / "ours") == []
    assert compare(tmp / "ours", tmp / "ours", atol=0, rtol=0) == []


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_a_perturbed_layer_is_found_at_exactly_that_layer(traces, tmp_path, layer):
    tmp, _ = traces
    shutil.copytree(tmp / "ours", tmp_path / "bad")
    t = load_file(str(tmp_path / "bad" / "trace.safetensors"))
    t["hidden"][layer + 1, 2, 7] += 1e-2  # index i + 1 holds layer i's output
    save_file(t, str(tmp_path / "bad" / "trace.safetensors"))
    found = compare(tmp / "ours", tmp_path / "bad")
    assert found and found[0].startswith(f"hidden state diverges first at layer {layer}")
    assert "stored position 2" in found[0]


def test_a_divergent_token_is_reported_with_its_step(traces, tmp_path):
    tmp, _ = traces
    shutil.copytree(tmp / "ours", tmp_path / "bad")
    meta = json.loads((tmp_path / "bad" / "trace.json").read_text())
    meta["tokens"][5] = (meta["tokens"][5] + 1) % 97
    (tmp_path / "bad" / "trace.json").write_text(json.dumps(meta))
    assert compare(tmp / "ours", tmp_path / "bad") == [
        f"generated token 5 differs: reference {(meta['tokens'][5] - 1) % 97}, other {meta['tokens'][5]}"]


def test_method_traces_record_their_decisions(traces, tmp_path):
    tmp, ours = traces
    trace(ours, PROMPT, tmp_path / "u", "unified", 6, {"r": 2})
    meta = json.loads((tmp_path / "u" / "trace.json").read_text())
    assert meta["steps"] == [{"kept_layers": [0, 3]}] and meta["flops"] > 0
    trace(ours, PROMPT, tmp_path / "a", "adainfer", 6, {"tau": 0.5})
    meta = json.loads((tmp_path / "a" / "trace.json").read_text())
    assert len(meta["steps"]) == len(meta["tokens"]) - 1 and all(0 <= s["exit_layer"] < 4 for s in meta["steps"])


def test_bad_trace_files_give_clear_errors(traces, tmp_path):
    tmp, _ = traces
    shutil.copytree(tmp / "ours", tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "trace.json").read_text())
    (tmp_path / "t" / "trace.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(TraceError, match="version 99; this reader understands 1"):
        compare(tmp / "ours", tmp_path / "t")
    (tmp_path / "t" / "trace.json").write_text(json.dumps({**meta, "model": {**meta["model"], "dim": 8}}))
    with pytest.raises(TraceError, match="different models"):
        compare(tmp / "ours", tmp_path / "t")
    (tmp_path / "t" / "trace.json").write_text(json.dumps(meta))
    data = (tmp_path / "t" / "trace.safetensors").read_bytes()
    (tmp_path / "t" / "trace.safetensors").write_bytes(data[:len(data) // 3])
    with pytest.raises(TraceError, match="truncated or corrupted"):
        compare(tmp / "ours", tmp_path / "t")
    (tmp_path / "t" / "trace.json").unlink()
    with pytest.raises(TraceError, match="trace.json is missing"):
        compare(tmp / "ours", tmp_path / "t")


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_pre"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_transformers_trace_in_any_dtype_compares_clean_with_its_defaults(tmp_path, variant, dtype):
    hf = build_hf(*VARIANTS[variant]).to(getattr(torch, dtype))
    hf.save_pretrained(tmp_path / "model", safe_serialization=True)
    ours = load_model(tmp_path / "model", dtype)
    ours.cfg.eos_token_id = []
    hf.generation_config.eos_token_id = None
    trace(ours, PROMPT, tmp_path / "ours", "full", max_new_tokens=8)
    write_transformers_trace(hf, PROMPT, tmp_path / "hf", 8)
    notes = []
    assert compare(tmp_path / "ours", tmp_path / "hf", notes=notes) == []
    assert json.loads((tmp_path / "hf" / "trace.json").read_text())["dtype"] == dtype
    assert notes == ["layer runs are in one trace only: not compared"]
    from skip.trace_compare import tolerances
    words = tolerances({"dtype": dtype}, {})[2]
    assert words.startswith(f"tolerances for {dtype}:") and ("per vector" in words) == (dtype != "float32")


def test_a_port_records_its_steps_with_fewer_keys(traces, tmp_path):
    tmp, ours = traces
    trace(ours, PROMPT, tmp_path / "u", "unified", 6, {"r": 2})
    meta = json.loads((tmp_path / "u" / "trace.json").read_text())
    hf = build_hf(*VARIANTS["llama_gqa"])
    for kept, want in ((meta["steps"][0]["kept_layers"], []), ([0, 2, 3], ["step 0 of unified differs"])):
        write_transformers_trace(hf, PROMPT, tmp_path / "port", method="unified", settings={"r": 2},
                                 tokens=meta["tokens"], steps=[{"kept_layers": kept, "port_note": "x"}], force=True)
        notes = []
        found = compare(tmp_path / "u", tmp_path / "port", notes=notes)
        assert [f[:len(w)] for f, w in zip(found, want)] == want and len(found) == len(want)
        assert "steps compared on ['kept_layers']; not in both traces: ['port_note']" in notes
    with pytest.raises(ValueError, match="pass the port's own tokens"):
        write_transformers_trace(hf, PROMPT, tmp_path / "x", method="unified")


@pytest.mark.parametrize("method,settings", [("unified", {"r": 2}), ("adainfer", {"tau": 0.5}), ("full", {})])
@pytest.mark.parametrize("step,layer", [(0, 0), (3, 3)])
def test_a_layer_perturbed_at_one_decode_step_is_found_at_that_step_and_layer(traces, tmp_path, method, settings,
                                                                              step, layer):
    tmp, ours = traces
    trace(ours, PROMPT, tmp_path / "ref", method, 8, settings)
    slot = len(PROMPT) + step
    block = ours.blocks[layer]
    original = block.forward

    def perturbed(h, rope, mask, cache, i, start, impl):
        out, a, m = original(h, rope, mask, cache, i, start, impl)
        return (out * 1.01 if start == slot else out), a, m  # 1% larger there: its norm shows it
    block.forward = perturbed
    try:
        trace(ours, PROMPT, tmp_path / "bad", method, 8, settings)
    finally:
        del block.forward
    found = compare(tmp_path / "ref", tmp_path / "bad")
    runs = json.loads((tmp_path / "ref" / "trace.json").read_text())["layer_runs"]
    if not any(s == slot and lay == layer for s, lay, _ in runs):  # this method skipped that layer there
        return
    assert found[0].startswith(f"inside the method, the hidden state diverges first at slot {slot} "
                               f"(decode step {step}), layer {layer}:"), found
