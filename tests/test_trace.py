"""The trace format: our decoder's trace against one written from transformers' hidden states,
a perturbation found at exactly its layer, and clear errors on bad files."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model
from skip.adainfer import trace as adainfer_trace
from skip.baselines import skipdecode_layer_sets
from skip.kangaroo_files import save_adapter
from skip.trace.format import TOP_K, TraceError
from skip.trace.methods import trace
from skip.trace.compare import compare
from skip.trace.port import write_transformers_trace

from conftest import VARIANTS, build_hf, random_adapter

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traces")
    hf = build_hf(*VARIANTS["llama_gqa"])
    hf.save_pretrained(tmp / "model", safe_serialization=True)
    ours = load_model(tmp / "model")
    ours.cfg.eos_token_id = []  # run the full length, as hf_trace does
    trace(ours, PROMPT, tmp / "ours", "full", max_new_tokens=12)
    save_adapter(random_adapter(ours, 2, 0, lens_like=True), tmp / "adapter")  # drafts as good as the logit lens
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
    from skip.trace.compare import tolerances
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


def step_trace(ours, tmp, path, method, settings=None, n=8):
    settings = {"adapter": str(tmp / "adapter")} if method == "kangaroo" and settings is None else settings
    trace(ours, PROMPT, path, method, n, settings)
    return json.loads((path / "trace.json").read_text())


def test_kangaroo_steps_hold_the_full_models_top_k_at_every_verified_position(traces, tmp_path):
    tmp, ours = traces
    meta = step_trace(ours, tmp, tmp_path / "k", "kangaroo", n=12)
    seq = PROMPT + meta["tokens"]
    with torch.no_grad():  # the oracle: one full forward pass over the whole output
        top = ours(torch.tensor([seq]))[0].float().softmax(-1).topk(TOP_K)  # (T, K)
    assert sum(st["accepted"] for st in meta["steps"]) > 0
    for st in meta["steps"]:
        k, a = st["drafted"], st["accepted"]
        n = st["cache_lengths"][0] - a - 1  # the slot of the round's x
        assert len(st["exited_norms"]) == len(st["verify_top_ids"]) == k + 1 and len(st["draft_top_ids"]) == k
        assert [d[0] for d in st["draft_top_ids"]] == st["drafts"]  # greedy drafts are the draft head's top-1
        for i in range(a + 1):  # positions whose prefix M accepted: M's own distribution there
            assert st["verify_top_ids"][i] == top.indices[n + i].tolist()
            assert st["verify_top_probs"][i] == pytest.approx(top.values[n + i].tolist(), abs=1e-5)
        assert all(st["verify_top_ids"][i][0] == st["drafts"][i] for i in range(a))
        assert a == k or st["verify_top_ids"][a][0] != st["drafts"][a]


def test_adainfer_steps_hold_the_features_of_a_full_pass_at_the_first_step(traces, tmp_path):
    tmp, ours = traces
    meta = step_trace(ours, tmp, tmp_path / "a", "adainfer", {"tau": 0.08})
    full = adainfer_trace(ours, PROMPT + meta["tokens"][:1], answer=0)  # the first fed-back token, every layer
    checks = meta["steps"][0]["checks"]  # a check after every layer up to the exit, none after the last
    assert [layer for layer, _, _ in checks] == list(range(min(meta["steps"][0]["exit_layer"] + 1, 3)))
    for layer, row, top1 in checks:
        assert row == pytest.approx(full.feats[layer].tolist(), abs=1e-5) and top1 == full.top1[layer]
    assert any(st["exit_layer"] < 3 for st in meta["steps"]), "tau 0.08 exits before the last layer"


def test_skipdecode_runs_the_layers_its_recorded_schedule_gives(traces, tmp_path):
    tmp, ours = traces
    meta = step_trace(ours, tmp, tmp_path / "s", "skipdecode", {"r": 2})
    ran = {}
    for slot, layer, norms in meta["layer_runs"]:
        for j in range(len(norms)):
            ran.setdefault(slot + j, []).append(layer)
    assert meta["steps"][0]["schedule"] == [len(s) for s in skipdecode_layer_sets(4, 2, 7)]
    assert [ran[len(PROMPT) + t] for t in range(7)] == skipdecode_layer_sets(4, 2, 7)


@pytest.mark.parametrize("key,index,delta,found", [
    ("verify_top_probs", (0, 0), 1e-6, None), ("verify_top_probs", (0, 1), 1e-2, "verify_top_probs[0][1]"),
    ("exited_norms", (1,), 1e-5, None), ("exited_norms", (1,), 1e-2, "exited_norms[1]"),
    ("draft_top_ids", (0, 2), 1, "draft_top_ids[0][2]")])
def test_compare_reads_steps_within_the_tolerances(traces, tmp_path, key, index, delta, found):
    tmp, ours = traces
    meta = step_trace(ours, tmp, tmp_path / "ref", "kangaroo")
    shutil.copytree(tmp_path / "ref", tmp_path / "bad")
    s = next(i for i, st in enumerate(meta["steps"]) if st["drafted"] >= 1)
    target = meta["steps"][s][key]
    for i in index[:-1]:
        target = target[i]
    target[index[-1]] += delta
    (tmp_path / "bad" / "trace.json").write_text(json.dumps(meta))
    out = compare(tmp_path / "ref", tmp_path / "bad")
    assert out == ([] if found is None else [out[0]]) and (found is None or out[0].startswith(
        f"step {s} of kangaroo differs at {found}: reference "))


@pytest.mark.parametrize("method,settings", [("unified", {"r": 2}), ("skipdecode", {"r": 2}), ("adainfer", {"tau": 0.5}),
                                             ("kangaroo", None), ("full", {})])
@pytest.mark.parametrize("step,layer", [(0, 0), (3, 3)])
def test_a_layer_perturbed_at_one_decode_step_is_found_at_that_step_and_layer(traces, tmp_path, method, settings,
                                                                              step, layer):
    tmp, ours = traces
    step_trace(ours, tmp, tmp_path / "ref", method, settings)
    slot = len(PROMPT) + step
    block = ours.blocks[layer]
    original = block.forward

    def perturbed(h, rope, mask, cache, i, start, impl):
        out, a, m = original(h, rope, mask, cache, i, start, impl)
        return (out * 1.01 if start == slot else out), a, m  # 1% larger there: its norm shows it
    block.forward = perturbed
    try:
        step_trace(ours, tmp, tmp_path / "bad", method, settings)
    finally:
        del block.forward
    found = compare(tmp_path / "ref", tmp_path / "bad")
    runs = json.loads((tmp_path / "ref" / "trace.json").read_text())["layer_runs"]
    # every method runs layer 0 at decode step 0 and the last layer at step 3 (AdaInfer at tau 0.5 does not exit)
    assert any(s == slot and lay == layer for s, lay, _ in runs), "the perturbed layer did not run at that slot"
    assert found and found[0].startswith(f"inside the method, the hidden state diverges first at slot {slot} "
                                         f"(decode step {step}), layer {layer}:"), found
