"""The trace format: our decoder's trace against one written from transformers' hidden states,
a perturbation found at exactly its layer, and clear errors on bad files."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model
from skip.trace import TraceError, compare, tensors, trace, write

from conftest import VARIANTS, build_hf

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def hf_trace(hf, cfg, path, max_new_tokens):
    """A trace written from transformers alone: output_hidden_states and its own generate."""
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        states = list(hf(x, output_hidden_states=True).hidden_states)  # L+1, the last one normed
        lens = lambda h, i: hf.lm_head(h if i == len(states) - 1 else hf.model.norm(h))[0, -1]  # noqa: E731
        t = tensors(states, lens, 4, 5)
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    write(path, cfg, PROMPT, out[0, len(PROMPT):].tolist(), t)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traces")
    hf = build_hf(*VARIANTS["llama_gqa"])
    hf.save_pretrained(tmp / "model", safe_serialization=True)
    ours = load_model(tmp / "model")
    ours.cfg.eos_token_id = []  # run the full length, as hf_trace does
    trace(ours, PROMPT, tmp / "ours", "full", max_new_tokens=12)
    hf_trace(hf, ours.cfg, tmp / "hf", 12)
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
