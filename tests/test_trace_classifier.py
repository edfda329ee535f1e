"""AdaInfer traces with a stop classifier file (threshold, SVM, CRF): the recorded scores against
each kind's formula recomputed in numpy from the recorded features and the file's parameters, the
decisions against the scores, the exits against the first stop, the tokens against the method run
directly; compare finds a perturbed score or a flipped decision at its step."""
import json
import shutil

import numpy as np
import pytest
import torch

from model import load_model
from skip.adainfer import SVM, CRFClassifier, Threshold
from skip.adainfer_files import ClassifierError, load_classifier, save_classifier
from skip.adainfer_gen import generate_adainfer
from skip.crf import CRF
from skip.trace.__main__ import main
from skip.trace.format import TraceError
from skip.trace.methods import trace

from conftest import LLAMA, build_hf

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
N = 12  # new tokens
L = 8  # layers: enough for the exits to spread
COLUMNS = ("gap", "top_prob", "cos_hidden", "cos_attn", "cos_mlp")  # a checks row, as docs/traces.md gives it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, model, {kind: classifier file}): classifiers whose stops vary across the tokens."""
    tmp = tmp_path_factory.mktemp("trace_classifier")
    build_hf("llama", dict(LLAMA, num_hidden_layers=L, num_key_value_heads=2)).save_pretrained(
        tmp / "model", safe_serialization=True)
    model = load_model(tmp / "model")
    model.cfg.eos_token_id = []  # run the full length
    traces = generate_adainfer(model, PROMPT, None, N, collect=True).traces  # every layer of every pass
    gaps = torch.cat([t.feats[:-1, 0] for t in traces])
    crf = CRFClassifier(("gap", "top_prob"))
    crf.crf = CRF(2)  # stops on a large gap, and a chain: a stop before makes a stop likelier
    crf.crf.W = torch.tensor([[0.0, 0.0], [10.0, 2.0]], dtype=torch.float64)
    crf.crf.b = torch.tensor([0.0, -10 * float(gaps.quantile(0.7)) - 1.0], dtype=torch.float64)
    crf.crf.T = torch.tensor([[0.5, -0.5], [-0.3, 0.3]], dtype=torch.float64)
    clfs = {"threshold": Threshold(float(gaps.quantile(0.7)), "gap"),
            "svm": SVM(("gap", "top_prob", "cos_hidden")).fit(traces, "final"), "crf": crf}
    files = {}
    for kind, clf in clfs.items():
        files[kind] = tmp / f"{kind}.json"
        save_classifier(clf, files[kind], model.cfg, trained_on="tiny")
    return tmp, model, files


def write(setup, path, kind, **settings):
    tmp, model, files = setup
    trace(model, PROMPT, path, "adainfer", N, {"classifier": files[kind], **settings})
    return json.loads((path / "trace.json").read_text())


def oracle_scores(clf_file, rows):
    """The score at each check of one pass, from the file's parameters: the feature (threshold),
    w . (x - mean) / std + b (svm), the online Viterbi margin delta[1] - delta[0] (crf)."""
    d = json.loads(clf_file.read_text())
    p = d["params"]
    X = np.asarray(rows, dtype=np.float64)[:, [COLUMNS.index(f) for f in d["features"]]]  # (checks, F)
    if d["kind"] == "threshold":
        return X[:, 0]
    if d["kind"] == "svm":
        return (X - np.asarray(p["mean"])) / np.asarray(p["std"]) @ np.asarray(p["w"]) + p["b"]
    W, b, T = (np.asarray(p[k]) for k in ("W", "b", "T"))
    delta, out = None, []
    for x in X:
        e = W @ x + b  # (2,) emission scores
        delta = e if delta is None else e + (delta[:, None] + T).max(0)
        out.append(delta[1] - delta[0])
    return np.asarray(out)


@pytest.mark.parametrize("kind,check_every", [("threshold", 1), ("svm", 1), ("crf", 1), ("svm", 2), ("threshold", 3)])
def test_the_recorded_scores_and_decisions_are_the_classifiers(setup, tmp_path, kind, check_every):
    tmp, model, files = setup
    meta = write(setup, tmp_path / "t", kind, check_every=check_every)
    d = json.loads(files[kind].read_text())
    assert meta["settings"] == {"classifier": {k: d[k] for k in ("kind", "features", "params")},
                                "check_every": check_every, "vocab": None}
    exits = [st["exit_layer"] for st in meta["steps"]]
    for st in meta["steps"]:
        layers, rows = [c[0] for c in st["checks"]], [c[1] for c in st["checks"]]
        assert layers == list(range(check_every - 1, min(st["exit_layer"] + 1, L - 1), check_every))
        assert st["scores"] == pytest.approx(oracle_scores(files[kind], rows).tolist(), rel=1e-9, abs=1e-12)
        tau = d["params"].get("tau")
        assert st["stops"] == [s >= tau if kind == "threshold" else s > 0 for s in st["scores"]]
        assert st["exit_layer"] == next((la for la, stop in zip(layers, st["stops"]) if stop), L - 1)
    assert len(set(exits)) >= 2 and min(exits) < L - 1, f"the stops do not vary: exits {exits}"
    direct = generate_adainfer(model, PROMPT, load_classifier(files[kind], model.cfg), N, check_every)
    assert meta["tokens"] == direct.tokens and exits == direct.exit_layers


def test_a_cheap_head_exit_is_a_stop_its_full_head_confirms(setup, tmp_path):
    tmp, model, files = setup
    vocab = list(range(0, 97, 2))
    meta = write(setup, tmp_path / "t", "svm", vocab=vocab)
    assert meta["settings"]["vocab"] == vocab
    for st in meta["steps"]:
        layers, rows = [c[0] for c in st["checks"]], [c[1] for c in st["checks"]]
        assert st["scores"] == pytest.approx(oracle_scores(files["svm"], rows).tolist(), rel=1e-9, abs=1e-12)
        assert st["stops"] == [s > 0 for s in st["scores"]] and all(c[2] in vocab for c in st["checks"])
        stopped = [la for la, stop in zip(layers, st["stops"]) if stop]
        assert st["exit_layer"] in stopped + [L - 1] and (not stopped or st["exit_layer"] >= stopped[0])
    direct = generate_adainfer(model, PROMPT, load_classifier(files["svm"], model.cfg), N, vocab=torch.tensor(vocab))
    assert meta["tokens"] == direct.tokens and [st["exit_layer"] for st in meta["steps"]] == direct.exit_layers


@pytest.mark.parametrize("kind", ["threshold", "svm", "crf"])
def test_a_trace_written_twice_compares_equal_wherever_the_file_lies(setup, tmp_path, kind, capsys):
    tmp, model, files = setup
    write(setup, tmp_path / "a", kind)
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.copy(files[kind], tmp_path / "elsewhere" / "c.json")
    trace(model, PROMPT, tmp_path / "b", "adainfer", N, {"classifier": moved})
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--atol", "0", "--rtol", "0"])
    assert e.value.code == 0, capsys.readouterr().out


@pytest.mark.parametrize("kind", ["svm", "crf"])
@pytest.mark.parametrize("key,change,found", [("scores", 1e-2, True), ("scores", 1e-6, False), ("stops", "flip", True)])
def test_compare_finds_a_changed_score_or_decision_at_its_step(setup, tmp_path, capsys, kind, key, change, found):
    meta = write(setup, tmp_path / "ref", kind)
    shutil.copytree(tmp_path / "ref", tmp_path / "bad")
    s = next(i for i, st in enumerate(meta["steps"]) if len(st["checks"]) >= 2)
    i = len(meta["steps"][s][key]) - 1
    was = meta["steps"][s][key][i]
    meta["steps"][s][key][i] = (not was) if change == "flip" else was + change
    (tmp_path / "bad" / "trace.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "ref"), str(tmp_path / "bad")])
    out = capsys.readouterr().out
    assert e.value.code == (1 if found else 0), out
    assert (f"step {s} of adainfer differs at {key}[{i}]: reference {was}, other {meta['steps'][s][key][i]}" in out) \
        == found, out


def test_bad_classifier_settings_raise_and_tau_traces_stay_as_they_were(setup, tmp_path):
    tmp, model, files = setup
    with pytest.raises(TraceError, match=r"unknown setting\(s\) \['tau'\] for adainfer with a classifier"):
        trace(model, PROMPT, tmp_path / "x", "adainfer", 2, {"classifier": files["svm"], "tau": 0.5})
    with pytest.raises(ValueError, match="check_every=1"):
        trace(model, PROMPT, tmp_path / "x", "adainfer", 2, {"classifier": files["crf"], "check_every": 2})
    with pytest.raises(TraceError, match="vocab must be"):
        trace(model, PROMPT, tmp_path / "x", "adainfer", 2, {"classifier": files["svm"], "vocab": [1, 97]})
    other = json.loads(files["svm"].read_text())
    (tmp_path / "other.json").write_text(json.dumps({**other, "model": {**other["model"], "dim": 8}}))
    with pytest.raises(ClassifierError, match="was fitted for a model with"):
        trace(model, PROMPT, tmp_path / "x", "adainfer", 2, {"classifier": tmp_path / "other.json"})
    trace(model, PROMPT, tmp_path / "tau", "adainfer", 4, {"tau": 0.05})
    meta = json.loads((tmp_path / "tau" / "trace.json").read_text())
    assert meta["settings"] == {"tau": 0.05} and all(set(st) == {"exit_layer", "checks"} for st in meta["steps"])


def test_the_command_line_writes_and_shows_a_classifier_trace(tiny_chat_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = load_model(tiny_chat_dir)
    save_classifier(Threshold(0.0, "top_prob"), tmp_path / "c.json", model.cfg)
    args = ["write", "--model", str(tiny_chat_dir), "--method", "adainfer", "--prompt", "Name three colours.",
            "--max-new-tokens", "4", "--classifier", str(tmp_path / "c.json")]
    main(args + ["--out", str(tmp_path / "t")])
    meta = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert meta["settings"] == {"classifier": {"kind": "threshold", "features": ["top_prob"], "params": {"tau": 0.0}},
                                "check_every": 1, "vocab": None}
    assert meta["steps"] and all(st["stops"] == [True] and st["exit_layer"] == 0 for st in meta["steps"])
    main(["show", str(tmp_path / "t")])  # the viewer reads the exits against the layer runs
    assert (tmp_path / "t" / "trace.png").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([a if a != "adainfer" else "full" for a in args] + ["--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --classifier is AdaInfer's stop classifier, not full's" in err
