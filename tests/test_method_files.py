"""Method files are checked when they are read: a Kangaroo adapter (skip/kangaroo_files.py) with a
non-finite weight, an exit layer that is not an integer in range, `frequent` ids that are not
distinct ids of the vocabulary, or sizes of another model is refused in one line; so is a stop
classifier (skip/adainfer_files.py) whose parameters leave the range where every score is finite,
or whose threshold lies outside its feature's values. What our fits give loads, and within the
range every score is finite (the reason for the range)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model
from skip.adainfer import FEATURES, SVM, CRFClassifier, Trace
from skip.adainfer_files import PARAM_MAX, STD_MIN, ClassifierError, load_classifier, save_classifier
from skip.kangaroo_adapter import AdapterError
from skip.kangaroo_files import load_adapter, save_adapter

from conftest import random_adapter, trace_refused

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    model = load_model(llama_dir)
    save_adapter(random_adapter(model, 2, 0, lens_like=False), tmp / "a")
    return tmp / "a", model


def edited_adapter(src, dst, meta_fn=None, tensors_fn=None):
    shutil.copytree(src, dst)
    if meta_fn is not None:
        (dst / "adapter.json").write_text(json.dumps(meta_fn(json.loads((dst / "adapter.json").read_text()))))
    if tensors_fn is not None:
        t = load_file(str(dst / "adapter.safetensors"))
        tensors_fn(t)
        save_file(t, str(dst / "adapter.safetensors"))
    return dst


def weight(t):
    return next(k for k in sorted(t) if k != "frequent")


BAD_ADAPTERS = {  # name: (adapter.json edit, tensors edit, the words of the refusal)
    "a NaN weight": (None, lambda t: t[weight(t)].view(-1).__setitem__(0, float("nan")), "are not floating point and finite"),
    "an infinite weight": (None, lambda t: t[weight(t)].view(-1).__setitem__(3, float("inf")), "finite"),
    "an integer weight": (None, lambda t: t.update({weight(t): t[weight(t)].long()}), "floating point"),
    "l true": (lambda m: {**m, "l": True}, None, "l must be an integer in [1, 3], got True"),
    "l a float": (lambda m: {**m, "l": 2.0}, None, "l must be an integer"),
    "l 0": (lambda m: {**m, "l": 0}, None, "l must be an integer in [1, 3]"),
    "l the last layer and more": (lambda m: {**m, "l": 4}, None, "l must be an integer in [1, 3]"),
    "no l": (lambda m: {k: v for k, v in m.items() if k != "l"}, None, "got None"),
    "a negative frequent id": (None, lambda t: t["frequent"].__setitem__(0, -1), "outside [0, 97)"),
    "a frequent id beyond the vocabulary": (None, lambda t: t["frequent"].__setitem__(0, 97), "outside [0, 97)"),
    "frequent ids as floats": (None, lambda t: t.update(frequent=t["frequent"].float()), "integer token ids"),
    "a frequent id twice": (None, lambda t: t["frequent"].__setitem__(1, t["frequent"][0]), "a token id twice"),
    "frequent of two dimensions": (None, lambda t: t.update(frequent=t["frequent"][None]), "integer token ids"),
    "a boolean size": (lambda m: {**m, "n_heads": True}, None, "trained for another model"),
    "another model's size": (lambda m: {**m, "dim": 32}, None, "dim 32 (model: 64)"),
    "a mis-shaped weight": (None, lambda t: t.update({weight(t): t[weight(t)][..., :1].contiguous()}), "mis-shaped"),
    "an unknown own setting": (lambda m: {**m, "own_config": {"rope_base": 10000}}, None, "own settings"),
    "a bad own setting": (lambda m: {**m, "own_config": {"norm_eps": -1.0}}, None, "bad adapter settings"),
    "a list for adapter.json": (lambda m: [m], None, "adapter.json must be an object"),
}


@pytest.mark.parametrize("name", list(BAD_ADAPTERS))
def test_a_bad_adapter_file_is_refused_naming_what_is_wrong(adapter, tmp_path, name):
    path, model = adapter
    meta_fn, tensors_fn, words = BAD_ADAPTERS[name]
    bad = edited_adapter(path, tmp_path / "bad", meta_fn, tensors_fn)
    with pytest.raises(AdapterError) as e:
        load_adapter(bad, model)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_good_adapter_loads_as_saved(adapter):
    path, model = adapter
    a = load_adapter(path, model)  # the oracle: the tensors in the file
    t = load_file(str(path / "adapter.safetensors"))
    assert a.l == 2 and all(torch.equal(v, t[k]) for k, v in a.state_dict().items())


def test_the_trace_command_refuses_a_nan_adapter_in_one_line(tiny_chat_dir, tmp_path, capsys):
    model = load_model(tiny_chat_dir)
    save_adapter(random_adapter(model, 2, 0, lens_like=False), tmp_path / "a")
    edited_adapter(tmp_path / "a", tmp_path / "nan", None, lambda t: t[weight(t)].view(-1).__setitem__(0, float("nan")))
    argv = ["write", "--model", str(tiny_chat_dir), "--method", "kangaroo", "--settings",
            json.dumps({"adapter": str(tmp_path / "nan")}), "--prompt", "hi", "--max-new-tokens", "2", "--out",
            str(tmp_path / "t")]
    assert "finite" in trace_refused(capsys, *argv)
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- stop classifiers
def synthetic_traces(seed, L=6, n=40):
    """Feature rows as the model gives them (probabilities in [0, 1], cosines in [-1, 1]) with
    labels that depend on them, so that a fit has something to find."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        feats = torch.rand(L, len(FEATURES), generator=g, dtype=torch.float64)
        feats[:, 2:] = feats[:, 2:] * 2 - 1
        top1 = [int(f[0] > 0.5) for f in feats]
        out.append(Trace(feats.float(), top1, answer=1))
    return out


@pytest.fixture
def cfg(llama_dir):
    return load_model(llama_dir).cfg


@pytest.mark.parametrize("seed", [0, 1])
def test_what_our_fits_give_loads_and_scores_finitely(cfg, tmp_path, seed):
    traces = synthetic_traces(seed)
    for clf in (SVM(("gap", "top_prob", "cos_hidden")).fit(traces), CRFClassifier(("gap", "cos_mlp")).fit(traces)):
        save_classifier(clf, tmp_path / "c.json", cfg)
        back = load_classifier(tmp_path / "c.json", cfg)  # the oracle: the fitted classifier's own decisions
        rows = [t.feats[i].tolist() for t in traces[:5] for i in range(6)]
        assert back.decisions(rows) == clf.decisions(rows)


@pytest.mark.parametrize("kind", ["svm", "crf"])
def test_at_the_edges_of_the_range_every_score_is_finite(kind):
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.uniform(-1, 1, (50, 5)), np.eye(5), -np.eye(5)])  # every feature's extremes
    if kind == "svm":
        clf = SVM(FEATURES)
        clf.mean, clf.std, clf.w, clf.b = np.full(5, -PARAM_MAX), np.full(5, STD_MIN), np.full(5, PARAM_MAX), PARAM_MAX
        scores = [s for s, _ in clf.decisions(rows)]
    else:
        from skip.crf import CRF
        clf = CRFClassifier(FEATURES)
        clf.crf = CRF.from_json({"W": np.full((2, 5), PARAM_MAX) * [[1], [-1]], "b": [PARAM_MAX, -PARAM_MAX],
                                 "T": [[PARAM_MAX, -PARAM_MAX], [-PARAM_MAX, PARAM_MAX]]})
        scores = [s for s, _ in clf.decisions(list(rows) * 20)]  # a chain of 1200 layers
    assert np.isfinite(scores).all()


@pytest.fixture
def svm_file(cfg, tmp_path):
    clf = SVM(("gap", "top_prob"))
    clf.mean, clf.std, clf.w, clf.b = np.zeros(2), np.ones(2), np.array([1.0, -1.0]), 0.5
    save_classifier(clf, tmp_path / "svm.json", cfg)
    return tmp_path / "svm.json"


BAD_CLASSIFIERS = {  # name: (edit of the file's JSON, the words of the refusal)
    "a weight of 1e308": (lambda d: d["params"].update(w=[1e308, 1.0]), "params.w holds a value beyond |v| <= 1e+06"),
    "a subnormal std": (lambda d: d["params"].update(std=[5e-324, 1.0]), "params.std holds a value beyond"),
    "a subnormal mean": (lambda d: d["params"].update(mean=[1e-310, 0.0]), "params.mean holds a value beyond"),
    "a std below SVM.fit's": (lambda d: d["params"].update(std=[1e-9, 1.0]), "at least 1e-08"),
    "a CRF transition of 1e308": (lambda d: d.update(kind="crf", params={"W": [[0, 0], [1, 1]], "b": [0, 0],
                                                                         "T": [[1e308, 0], [0, 0]]}), "params.T"),
    "a gap threshold above 1": (lambda d: d.update(kind="threshold", features=["gap"], params={"tau": 1.5}),
                                "outside [0, 1]"),
    "a negative probability threshold": (lambda d: d.update(kind="threshold", features=["top_prob"],
                                                            params={"tau": -0.1}), "outside [0, 1]"),
    "a cosine threshold below -1": (lambda d: d.update(kind="threshold", features=["cos_hidden"],
                                                       params={"tau": -1.5}), "outside [-1, 1]"),
    "a feature twice": (lambda d: d.update(features=["gap", "gap"]), "distinct names"),
    "a list for the file": (lambda d: [d], "not a classifier file"),
}


@pytest.mark.parametrize("name", list(BAD_CLASSIFIERS))
def test_a_classifier_out_of_range_is_refused_in_one_line(cfg, svm_file, name):
    edit, words = BAD_CLASSIFIERS[name]
    d = json.loads(svm_file.read_text())
    d = edit(d) or d
    svm_file.write_text(json.dumps(d))
    with pytest.raises(ClassifierError) as e:
        load_classifier(svm_file, cfg)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_cosine_threshold_may_be_negative(cfg, svm_file):
    svm_file.write_text(json.dumps({**json.loads(svm_file.read_text()), "kind": "threshold",
                                    "features": ["cos_hidden"], "params": {"tau": -0.5}}))
    assert load_classifier(svm_file, cfg).tau == -0.5


def test_a_classifier_that_is_not_json_is_never_written(cfg, tmp_path):
    clf = SVM(("gap",))
    clf.mean, clf.std, clf.w, clf.b = np.zeros(1), np.ones(1), np.array([float("nan")]), 0.0
    with pytest.raises(ClassifierError, match="not finite"):
        save_classifier(clf, tmp_path / "c.json", cfg)
    assert not (tmp_path / "c.json").exists()


# ---------------------------------------------------------------- files whose content lies
def test_a_tokenizer_whose_content_lies_is_refused_naming_what(smollm2_dir, tmp_path):
    import json
    from tokenizer.bpe import BPETokenizer
    spec = json.loads((smollm2_dir / "tokenizer.json").read_text())
    # SmolLM2's tokenizer cut to its first 2,000 ids (the merges among them): the same reader, fast
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < 2000}
    spec["model"].update(vocab=vocab, merges=[m for m in spec["model"]["merges"] if all(p in vocab for p in m)
                                              and "".join(m) in vocab])
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < 2000]
    (tmp_path / "cut.json").write_text(json.dumps(spec))
    BPETokenizer.from_tokenizer_json(tmp_path / "cut.json")  # reads as it stands
    first = next(iter(vocab))
    for i, (change, said) in enumerate([
            (lambda s: s["model"]["merges"].insert(0, "zzqx yyqx"), "merge 0 .* not in the vocabulary"),
            (lambda s: s["model"]["vocab"].update({first: 1}), "two tokens share an id"),
            (lambda s: s["model"]["vocab"].update({first: -1}), "integer ids in"),
            (lambda s: s["model"]["vocab"].update({first: 10 ** 12}), "integer ids in"),
            (lambda s: s["model"]["vocab"].update({first: 1.5}), "integer ids in"),
            (lambda s: s["model"]["merges"].insert(0, "abc"), "merge 0 is not a pair")]):
        s = json.loads(json.dumps(spec))
        change(s)
        (tmp_path / f"t{i}.json").write_text(json.dumps(s))
        with pytest.raises(ValueError, match=said):
            BPETokenizer.from_tokenizer_json(tmp_path / f"t{i}.json")
    text = (tmp_path / "cut.json").read_text()
    (tmp_path / "twice.json").write_text(text.replace('"model": {', '"model": {"type": "WordPiece", ', 1))
    with pytest.raises(ValueError, match="'type' appears twice"):
        BPETokenizer.from_tokenizer_json(tmp_path / "twice.json")


def test_an_official_pickle_that_is_not_a_state_dict_is_refused(llama_dir, tmp_path):
    import torch
    from weights.kangaroo_official import OfficialAdapterError, read_official
    for i, obj in enumerate([[torch.zeros(2)], {1: torch.zeros(2)}]):
        torch.save(obj, tmp_path / f"p{i}.bin")
        with pytest.raises(OfficialAdapterError, match="not a state dict of named tensors"):
            read_official(tmp_path / f"p{i}.bin", 10 ** 6)


def test_a_task_file_with_a_key_twice_is_refused(tmp_path):
    from skip.harness.tasks import from_jsonl
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "Q:", "answer": " A"}\n{"prompt": "Q:", "answer": " A", "answer": " B"}\n')
    with pytest.raises(ValueError, match="t.jsonl, line 2: the key 'answer' appears twice"):
        from_jsonl(f)
