"""`skip.trace compare` and `show` never pass garbage: every malformed trace is refused with status
2 and one line (skip/trace/check.py), every real difference is status 1 (ranks of the logit lens
past the first, FLOPs, steps with no key in common), the same run is status 0 (a trace against
itself, one adapter under two spellings of its path), and nothing is written that is not JSON."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model
from skip.adainfer import Threshold
from skip.adainfer_files import save_classifier
from skip.kangaroo_files import save_adapter
from skip.trace.format import TraceError, write
from skip.trace.methods import trace
from skip.trace.compare import first_difference, tolerances

from conftest import random_adapter, trace_cli, trace_refused

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def traces(llama_dir, tmp_path_factory):
    """(folder, model): traces f (full), k (Kangaroo, eta 0: every round drafts), c (AdaInfer with
    a stop classifier file), the adapter folder and the classifier file."""
    tmp = tmp_path_factory.mktemp("garbage")
    model = load_model(llama_dir)
    model.cfg.eos_token_id = []
    save_adapter(random_adapter(model, 2, 0, lens_like=True), tmp / "adapter")
    save_classifier(Threshold(0.05, "gap"), tmp / "c.json", model.cfg)
    trace(model, PROMPT, tmp / "f", "full", 8)
    trace(model, PROMPT, tmp / "k", "kangaroo", 8, {"adapter": str(tmp / "adapter"), "eta": 0.0})
    trace(model, PROMPT, tmp / "c", "adainfer", 6, {"classifier": tmp / "c.json"})
    return tmp, model


def edited(src, dst, meta_fn=None, tensors_fn=None):
    """A copy of trace src at dst with trace.json through meta_fn (returns the new JSON, written as
    Python writes it, NaN included) and the tensors through tensors_fn (edits the dict in place)."""
    shutil.copytree(src, dst)
    if meta_fn is not None:
        meta = meta_fn(json.loads((dst / "trace.json").read_text()))
        (dst / "trace.json").write_text(json.dumps(meta))
    if tensors_fn is not None:
        t = load_file(str(dst / "trace.safetensors"))
        tensors_fn(t)
        save_file(t, str(dst / "trace.safetensors"))
    return dst


def step_with_drafts(meta):
    return next(s for s, st in enumerate(meta["steps"]) if st["drafted"] >= 2)


def set_step(meta, key, fn):
    s = step_with_drafts(meta) if meta["method"] == "kangaroo" else 0
    meta["steps"][s][key] = fn(meta["steps"][s][key])
    return meta


GARBAGE = {  # name: (trace, trace.json edit, tensors edit, the words of the refusal)
    "empty step": ("k", lambda m: {**m, "steps": [m["steps"][0], {}] + m["steps"][2:]}, None, "non-empty objects"),
    "a list for the trace": ("f", lambda m: [m], None, "holds list, not an object"),
    "a list for the model": ("f", lambda m: {**m, "model": list(m["model"].values())}, None, "model must be an object"),
    "a list for settings": ("k", lambda m: {**m, "settings": list(m["settings"])}, None, "settings must be an object"),
    "an object for steps": ("k", lambda m: {**m, "steps": {"0": m["steps"][0]}}, None, "steps must be a list"),
    "no steps": ("f", lambda m: {k: v for k, v in m.items() if k != "steps"}, None, "lacks ['steps']"),
    "no version": ("f", lambda m: {k: v for k, v in m.items() if k != "version"}, None, "version None"),
    "an unknown field": ("f", lambda m: {**m, "extra": 1}, None, "unknown fields ['extra']"),
    "a token id stored as a float": ("f", lambda m: {**m, "tokens": [float(t) for t in m["tokens"]]}, None,
                                     "tokens must be a list of integer token ids"),
    "a token id beyond the vocabulary": ("f", lambda m: {**m, "tokens": m["tokens"][:-1] + [97]}, None,
                                         "tokens must be a list of integer token ids in [0, 97)"),
    "a boolean prompt id": ("f", lambda m: {**m, "prompt": [True] + m["prompt"][1:]}, None, "prompt must be"),
    "an empty prompt": ("f", lambda m: {**m, "prompt": []}, None, "the prompt is empty"),
    "NaN in trace.json": ("k", lambda m: set_step(m, "exited_norms", lambda v: [math.nan] + v[1:]), None,
                          "non-finite number at .steps"),
    "a draft id stored as a float": ("k", lambda m: set_step(m, "drafts", lambda v: [v[0] + 0.0] + v[1:]), None,
                                     "drafts must be a list of (a token id)"),
    "a boolean count": ("k", lambda m: set_step(m, "drafted", lambda v: True), None, "drafted must be an integer"),
    "a stop decision stored as a number": ("c", lambda m: set_step(m, "stops", lambda v: [int(x) for x in v]), None,
                                           "stops must be a list of (a boolean)"),
    "steps with other keys": ("k", lambda m: {**m, "steps": [m["steps"][0], {"drafted": 1}] + m["steps"][2:]}, None,
                              "every step records the same keys"),
    "an unknown method": ("f", lambda m: {**m, "method": "magic"}, None, "method 'magic' is none of"),
    "an unknown dtype": ("f", lambda m: {**m, "dtype": "float8"}, None, "dtype 'float8' is none of"),
    "a layer index stored as a float": ("f", lambda m: {**m, "layer_runs": [[0, 0.0, [1.0]]] + m["layer_runs"][1:]},
                                        None, "layer_runs must be"),
    "FLOPs in words": ("f", lambda m: {**m, "flops": "many"}, None, "flops must be null or a number"),
    "an unknown tensor": ("f", None, lambda t: t.update(extra=torch.full((2,), 1e30)), "unknown tensors ['extra']"),
    "a missing tensor": ("f", None, lambda t: t.pop("lens_probs"), "lacks ['lens_probs']"),
    "lens ids stored as floats": ("f", None, lambda t: t.update(lens_ids=t["lens_ids"].float()),
                                  "lens_ids is torch.float32: token ids are integers"),
    "an empty hidden tensor": ("f", None, lambda t: t.update(hidden=t["hidden"][:, :0]), "tensor hidden has shape"),
    "a hidden tensor of another model": ("f", None, lambda t: t.update(hidden=t["hidden"][:-1]),
                                         "tensor hidden has shape"),
    "integer norms": ("f", None, lambda t: t.update(hidden_norms=t["hidden_norms"].long()), "not floating point"),
    "a lens id beyond the vocabulary": ("f", None, lambda t: t["lens_ids"].__setitem__((0, 1), 97), "outside [0, 97)"),
    "a lens id listed twice": ("f", None, lambda t: t["lens_ids"].__setitem__((0, 1), t["lens_ids"][0, 0]),
                               "lists an id twice"),
    "a probability above 1": ("f", None, lambda t: t["lens_probs"].__setitem__((0, 0), 1.5), "outside [0, 1]"),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_a_garbage_trace_is_refused_in_one_line_with_status_2(traces, tmp_path, capsys, name):
    tmp, _ = traces
    src, meta_fn, tensors_fn, words = GARBAGE[name]
    bad = edited(tmp / src, tmp_path / "bad", meta_fn, tensors_fn)
    for args in (("compare", tmp / src, bad), ("compare", bad, tmp / src), ("compare", bad, bad)):
        assert words in trace_refused(capsys, *args)
    pytest.importorskip("matplotlib")
    assert words in trace_refused(capsys, "show", bad, "--out", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_tensor_unknown_to_the_format_is_refused_even_where_both_traces_hold_it(traces, tmp_path, capsys):
    tmp, _ = traces  # 0 against 1e30 once passed, unread
    zero = edited(tmp / "f", tmp_path / "zero", None, lambda t: t.update(extra=torch.zeros(2)))
    huge = edited(tmp / "f", tmp_path / "huge", None, lambda t: t.update(extra=torch.full((2,), 1e30)))
    assert "unknown tensors ['extra']" in trace_refused(capsys, "compare", zero, huge)


@pytest.mark.parametrize("flag,value", [("--atol", "-1"), ("--atol", "nan"), ("--rtol", "inf"), ("--rtol", "-0.0001")])
def test_a_tolerance_that_is_not_a_finite_number_at_least_0_is_refused(traces, capsys, flag, value):
    tmp, _ = traces
    assert f"{flag[2:]} must be a finite number >= 0" in trace_refused(capsys, "compare", tmp / "f", tmp / "f", flag, value)
    with pytest.raises(TraceError, match="must be a finite number >= 0"):
        tolerances({}, {}, atol=float(value) if flag == "--atol" else None, rtol=float(value) if flag == "--rtol" else None)


@pytest.mark.parametrize("src", ["f", "k", "c"])
def test_a_trace_against_itself_agrees_with_status_0(traces, capsys, src):
    tmp, _ = traces
    code, out, _ = trace_cli(capsys, "compare", tmp / src, tmp / src, "--atol", "0", "--rtol", "0")
    assert code == 0 and out.endswith("the traces agree within the tolerances\n"), out


def lens_rows(meta_dir):
    t = load_file(str(meta_dir / "trace.safetensors"))
    return t["lens_ids"], t["lens_probs"]


def test_lens_ids_past_the_first_rank_are_compared_and_a_tie_may_swap(traces, tmp_path, capsys):
    tmp, _ = traces
    ids, probs = lens_rows(tmp / "f")
    gaps = probs[:, 1:-1] - probs[:, 2:]  # (L+1, k-2) rank r against r + 1, for r >= 1
    i, r = divmod(int(gaps.argmax()), gaps.shape[1])
    r += 1
    assert float(gaps.max()) > 1e-3, "no two ranks past the first are apart"

    def swap(t):
        t["lens_ids"][i, [r, r + 1]] = t["lens_ids"][i, [r + 1, r]]
    swapped = edited(tmp / "f", tmp_path / "swapped", None, swap)
    code, out, _ = trace_cli(capsys, "compare", tmp / "f", swapped)
    assert code == 1 and f"logit-lens rank {r} id differs first at hidden index {i}" in out, out
    absent = next(v for v in range(97) if v not in ids[i].tolist())
    other = edited(tmp / "f", tmp_path / "other", None, lambda t: t["lens_ids"].__setitem__((i, r), absent))
    code, out, _ = trace_cli(capsys, "compare", tmp / "f", other)
    assert code == 1 and f"logit-lens rank {r} id differs first at hidden index {i}: {int(ids[i, r])} vs {absent}" in out

    def tie(t):  # the two ranks now tie: their order is arbitrary, so the swap agrees
        t["lens_probs"][i, r + 1] = t["lens_probs"][i, r]
    tied = edited(tmp / "f", tmp_path / "tied", None, tie)
    tied_swapped = edited(tied, tmp_path / "tied_swapped", None, swap)
    assert trace_cli(capsys, "compare", tied, tied_swapped, "--atol", "0", "--rtol", "0")[0] == 0


def test_one_adapter_under_another_spelling_of_its_path_is_the_same_run(traces, tmp_path, capsys, monkeypatch):
    tmp, model = traces
    shutil.copytree(tmp / "adapter", tmp_path / "copy")
    trace(model, PROMPT, tmp_path / "copied", "kangaroo", 8, {"adapter": str(tmp_path / "copy"), "eta": 0.0})
    monkeypatch.chdir(tmp)
    trace(model, PROMPT, tmp_path / "relative", "kangaroo", 8, {"adapter": "./adapter/", "eta": 0.0})
    for other in ("copied", "relative"):
        code, out, _ = trace_cli(capsys, "compare", tmp / "k", tmp_path / other, "--atol", "0", "--rtol", "0")
        assert code == 0, out
    save_adapter(random_adapter(model, 2, 1, lens_like=True), tmp_path / "another")
    elsewhere = edited(tmp / "k", tmp_path / "elsewhere", lambda m: {**m, "settings": {
        **m["settings"], "adapter": str(tmp_path / "another")}})
    code, out, _ = trace_cli(capsys, "compare", tmp / "k", elsewhere)
    assert code == 1 and out.splitlines()[1].startswith("the runs differ: reference kangaroo"), out
    gone = edited(tmp / "k", tmp_path / "gone", lambda m: {**m, "settings": {**m["settings"], "adapter": "/no/such"}})
    code, out, _ = trace_cli(capsys, "compare", tmp / "k", gone)
    assert code == 1 and "setting adapter: /no/such not found here, compared by its spelling" in out, out


def test_flops_and_steps_with_no_key_in_common_diverge(traces, tmp_path, capsys):
    tmp, _ = traces
    more = edited(tmp / "k", tmp_path / "flops", lambda m: {**m, "flops": m["flops"] + 1})
    code, out, _ = trace_cli(capsys, "compare", tmp / "k", more)
    assert code == 1 and "the FLOPs differ" in out, out
    renamed = edited(tmp / "k", tmp_path / "renamed", lambda m: {**m, "steps": [
        {k.upper(): v for k, v in st.items()} for st in m["steps"]]})
    code, out, _ = trace_cli(capsys, "compare", tmp / "k", renamed)
    assert code == 1 and "the steps share no key" in out, out


def test_a_boolean_is_never_equal_to_a_number_in_a_step():
    tol = tolerances({}, {})[0]
    assert first_difference([True, 0], [1, 0], tol) == ("[0]", True, 1)
    assert first_difference({"x": 1.0}, {"x": 1}, tol) is None  # JSON's 1 and 1.0 are one number


def test_an_unforeseen_error_is_one_line_and_status_2_not_1(traces, capsys, monkeypatch):
    tmp, _ = traces

    def boom(*a, **k):
        raise KeyError("two\nlines")
    monkeypatch.setattr("skip.trace.compare.findings", boom)
    assert "KeyError" in trace_refused(capsys, "compare", tmp / "f", tmp / "f")


def test_the_command_line_refuses_garbage_without_a_traceback(traces, tmp_path):
    tmp, _ = traces
    bad = edited(tmp / "f", tmp_path / "bad", lambda m: [m])
    p = subprocess.run([sys.executable, "-m", "skip.trace", "compare", str(tmp / "f"), str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("settings,words", [
    ({"tau": math.nan}, "setting tau must be a number in [0, 1]"), ({"tau": math.inf}, "setting tau"),
    ({"tau": True}, "setting tau"), ({"tau": 1.5}, "setting tau")])
def test_a_tau_that_never_stops_is_refused(traces, tmp_path, settings, words):
    tmp, model = traces
    with pytest.raises(TraceError, match=words.replace("[", r"\[").replace("]", r"\]")):
        trace(model, PROMPT, tmp_path / "t", "adainfer", 4, settings)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("draft_vocab", [-1, 0, True, 2.0, 98])
def test_a_draft_vocabulary_that_is_not_a_count_of_frequent_tokens_is_refused(traces, tmp_path, draft_vocab):
    tmp, model = traces
    with pytest.raises(ValueError, match="draft_vocab"):
        trace(model, PROMPT, tmp_path / "t", "kangaroo", 4, {"adapter": str(tmp / "adapter"), "draft_vocab": draft_vocab})


@pytest.mark.parametrize("text", ['{"tau": NaN}', '{"tau": Infinity}', '{"eta": -Infinity}'])
def test_settings_that_are_not_json_are_refused_at_the_command_line(traces, tmp_path, capsys, text):
    tmp, _ = traces
    err = trace_refused(capsys, "write", "--method", "adainfer", "--settings", text, "--prompt", "x", "--out", tmp_path / "w")
    assert "which is not JSON" in err


def test_nothing_that_is_not_json_is_written(traces, tmp_path):
    tmp, model = traces
    t = load_file(str(tmp / "f" / "trace.safetensors"))
    with pytest.raises(TraceError, match="non-finite number"):
        write(tmp_path / "t", model.cfg, PROMPT, [1], t, "unified", {"r": 2}, [{"kept_layers": [0], "x": math.nan}])
    assert not (tmp_path / "t").exists()
