"""Bad input ends in one clear error. (Writes: nothing lost or half-written, tests/test_files.py.)"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import LoadError, generate, load_config, load_model
from model.config import ConfigError
from weights.files import OutputExists
from skip.trace.format import TraceError, write
from skip.trace.methods import trace
from skip.trace.compare import compare

from conftest import refused

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


@pytest.fixture
def model_dir(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "m")
    return tmp_path / "m"


# ---------------------------------------------------------------- config and weights
@pytest.mark.parametrize("change, field", [
    ({"num_hidden_layers": "4"}, "n_layers"), ({"eos_token_id": "2"}, "eos_token_id"),
    ({"rms_norm_eps": -1e-5}, "norm_eps"), ({"max_position_embeddings": 0}, "max_seq_len"),
    ({"vocab_size": None}, "vocab_size")])
def test_a_bad_config_value_is_named(model_dir, change, field):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConfigError, match=field):
        load_model(model_dir)


def test_invalid_or_incomplete_config_json_is_a_config_error(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(ConfigError, match="no 'hidden_size'"):
        load_config(model_dir)
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_config(model_dir)


def test_non_floating_and_non_finite_weights_are_refused(model_dir):
    t = load_file(str(model_dir / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    save_file({**t, name: t[name].to(torch.int8)}, str(model_dir / "model.safetensors"))
    with pytest.raises(LoadError, match=r"not floating point \(1\).*up_proj.weight \(I8\)"):
        load_model(model_dir)
    bad = t[name].clone()
    bad[0, 0] = float("nan")
    save_file({**t, name: bad}, str(model_dir / "model.safetensors"))
    with pytest.raises(LoadError, match="non-finite values"):
        load_model(model_dir)
    assert math.isnan(float(load_model(model_dir, allow_nonfinite=True).blocks[0].mlp.up.weight[0, 0].detach()))


def test_a_shard_index_must_stay_inside_the_model_folder(model_dir):
    names = load_file(str(model_dir / "model.safetensors"))
    index = {"weight_map": {k: "../elsewhere/model.safetensors" for k in names}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="points outside"):
        load_model(model_dir)
    index = {"weight_map": {k: "missing-00001.safetensors" for k in index["weight_map"]}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="do not exist: missing-00001.safetensors"):
        load_model(model_dir)


def test_a_long_error_list_is_summarised(model_dir):
    t = load_file(str(model_dir / "model.safetensors"))
    save_file({k.replace("model.", "other."): v for k, v in t.items()}, str(model_dir / "model.safetensors"))
    with pytest.raises(LoadError) as e:
        load_model(model_dir)
    assert "... and" in str(e.value) and len(str(e.value)) < 2000


# ---------------------------------------------------------------- generation and the CLI
def test_lengths_and_numbers_are_checked_before_anything_is_allocated(llama_dir):
    m = load_model(llama_dir)
    for kw, match in (({"max_new_tokens": 0}, "positive integer"), ({"max_new_tokens": 10**6}, "exceed the model's"),
                      ({"temperature": float("nan")}, "finite temperature"),
                      ({"temperature": float("inf")}, "finite temperature")):
        with pytest.raises(ValueError, match=match):
            generate(m, [PROMPT], **kw)


@pytest.mark.parametrize("args", [["--prompt", "hi", "--max-new-tokens", "0"],
                                  ["--prompt", "hi", "--temperature", "nan"], ["--prompt", ""]])
def test_the_generate_cli_ends_bad_input_in_one_line_with_status_2(tiny_chat_dir, args, capsys):
    from model.__main__ import main
    refused(main, ["generate", "--model", str(tiny_chat_dir), "--no-chat", *args], capsys)


@pytest.mark.parametrize("name, text", [("tokenizer.json", "[1, 2]"), ("tokenizer.json", '{"model": []}'),
                                        ("tokenizer_config.json", "[]"), ("tokenizer_config.json", '{"chat_template": 3}')])
def test_tokenizer_files_of_the_wrong_shape_end_in_one_line(tiny_chat_dir, tmp_path, name, text, capsys):
    from model.__main__ import main
    d = tmp_path / "m"
    shutil.copytree(tiny_chat_dir, d)
    (d / name).write_text(text)
    assert str(d) in refused(main, ["generate", "--model", str(d), "--prompt", "hi", "--max-new-tokens", "2"], capsys)


# ---------------------------------------------------------------- traces
@pytest.fixture
def ours(llama_dir, tmp_path):
    m = load_model(llama_dir)
    m.cfg.eos_token_id = []
    trace(m, PROMPT, tmp_path / "ref", "full", max_new_tokens=6)
    return m, tmp_path


def edited(tmp_path, name, fn):
    shutil.copytree(tmp_path / "ref", tmp_path / name)
    t = load_file(str(tmp_path / name / "trace.safetensors"))
    fn(t)
    save_file(t, str(tmp_path / name / "trace.safetensors"))
    return tmp_path / name


def test_compare_reports_nan_where_it_first_appears(ours):
    _, tmp = ours
    bad = edited(tmp, "nan", lambda t: t["hidden"][3, 1].__setitem__(5, float("nan")))
    found = compare(tmp / "ref", bad)
    assert found and found[0].startswith("hidden state is nan first at layer 2, stored position 1")


def test_compare_checks_norms_and_lens_probabilities(ours):
    _, tmp = ours
    bad = edited(tmp, "norms", lambda t: t["hidden_norms"][2].__setitem__(0, t["hidden_norms"][2, 0] + 1))
    assert compare(tmp / "ref", bad)[0].startswith("hidden-state norm diverges first at layer 1, prompt position 0")
    bad = edited(tmp, "lens", lambda t: t["lens_probs"][3].__setitem__(1, 0.5))
    assert compare(tmp / "ref", bad)[0].startswith("logit-lens probability diverges first at layer 2, rank 1")


def test_compare_checks_steps_even_when_settings_differ(ours):
    m, tmp = ours
    trace(m, PROMPT, tmp / "u2", "unified", 6, {"r": 2})
    shutil.copytree(tmp / "u2", tmp / "u3")
    meta = json.loads((tmp / "u3" / "trace.json").read_text())
    meta["settings"]["r"] = 4
    meta["steps"][0]["kept_layers"] = [0]
    (tmp / "u3" / "trace.json").write_text(json.dumps(meta))
    found = compare(tmp / "u2", tmp / "u3")
    assert found[0] == "the runs differ: reference unified {'r': 2}, other unified {'r': 4}"
    assert any(f.startswith("step 0 of unified differs") for f in found)


def test_a_trace_records_every_setting_and_a_missing_file_is_named(ours):
    m, tmp = ours
    trace(m, PROMPT, tmp / "a", "adainfer", 4)
    assert json.loads((tmp / "a" / "trace.json").read_text())["settings"] == {"tau": 0.8}
    with pytest.raises(TraceError, match="unknown setting"):
        trace(m, PROMPT, tmp / "b", "unified", 4, {"ratio": 2})
    (tmp / "a" / "trace.safetensors").unlink()
    with pytest.raises(TraceError, match="trace.safetensors is missing"):
        compare(tmp / "ref", tmp / "a")
    with pytest.raises(OutputExists):
        write(tmp, m.cfg, PROMPT, [], {})  # a folder of other files is never replaced


def test_the_trace_cli_ends_bad_settings_in_one_line_with_status_2(ours, capsys):
    from skip.trace.__main__ import main
    _, tmp = ours
    argv = ["write", "--method", "unified", "--settings", "[1]", "--prompt", "x", "--out", str(tmp / "w")]
    assert "must be a JSON object" in refused(main, argv, capsys)


# ---------------------------------------------------------------- task files
@pytest.mark.parametrize("line, match", [
    ('{"prompt": "Q:", "answer": " C", "choices": [" A", " B"]}', "line 2: the answer ' C' is not among the choices"),
    ('{"prompt": "Q:", "answer": " A", "choices": " AB"}', "line 2: 'choices' must be a list"),
    ('{"prompt": "Q:", "answer": 3}', "line 2: 'prompt' and 'answer' must be strings"),
    ('{"prompt": "Q:", "answer": " A"', "line 2: not JSON"),
    ("[1, 2]", "line 2: expected a JSON object, got an array"), ('"text"', "line 2: expected a JSON object, got a string"),
    ("3", "line 2: expected a JSON object, got a number"), ("null", "line 2: expected a JSON object, got null")])
def test_a_bad_task_line_is_named_with_its_file_and_line(tmp_path, line, match):
    from skip.harness.tasks import from_jsonl
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "Q:", "answer": " A", "choices": [" A", " B"]}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl, {match}"):
        from_jsonl(f)


def test_task_file_split_sizes_are_honoured_or_refused(tmp_path):
    from skip.harness.tasks import from_jsonl
    f = tmp_path / "t.jsonl"
    f.write_text("".join(f'{{"prompt": "Q{i}:", "answer": " A"}}\n' for i in range(10)))
    task = from_jsonl(f, n_train=3, n_test=4)
    assert (len(task.train), len(task.test)) == (3, 4)
    assert not {i.prompt for i in task.train} & {i.prompt for i in task.test}
    with pytest.raises(ValueError, match="10 instances cannot give 8 to train and 4 to test"):
        from_jsonl(f, n_train=8, n_test=4)
    f.write_text('{"prompt": "Q:", "answer": " A"}\n')
    with pytest.raises(ValueError, match="1 instances cannot give 0 to train"):
        from_jsonl(f)


def test_the_cross_task_table_says_when_there_is_nothing_to_transfer():
    from skip.harness.eval_adainfer import cross_table
    assert cross_table({}, 0) == "Cross-task: no SVM was fitted at 0 shots, so there is nothing to transfer."


# ---------------------------------------------------------------- classifiers and method settings
@pytest.fixture
def svm_file(llama_dir, tmp_path):
    from skip.adainfer import SVM
    from skip.adainfer_files import save_classifier
    clf = SVM(("gap", "top_prob"))
    clf.mean, clf.std, clf.w, clf.b = np.zeros(2), np.ones(2), np.array([1.0, -1.0]), 0.5
    save_classifier(clf, tmp_path / "svm.json", load_model(llama_dir).cfg)
    return tmp_path / "svm.json", load_model(llama_dir).cfg


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["params"].update(w=["1", "2"]), r"params.w must be numbers of shape \(2,\)"),
    (lambda d: d["params"].update(w=[1.0]), r"params.w must be numbers of shape \(2,\)"),
    (lambda d: d["params"].update(std=[0.0, 1.0]), "params.std must be positive"),
    (lambda d: d["params"].update(b=float("nan")), "params.b holds a non-finite value"),
    (lambda d: d.update(kind="tree"), "unknown kind 'tree'"),
    (lambda d: d.update(features=["gap", "entropy"]), "features"),
    (lambda d: d.update(kind="threshold", params={"tau": float("nan")}, features=["gap"]), "params.tau holds a non-finite"),
    (lambda d: d.pop("params"), "not a classifier file"),
])
def test_a_classifier_file_is_checked_when_it_is_loaded_not_when_it_is_used(svm_file, edit, match):
    from skip.adainfer_files import ClassifierError, load_classifier
    path, cfg = svm_file
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    with pytest.raises(ClassifierError, match=match):
        load_classifier(path, cfg)
    path.write_text("{not json")
    with pytest.raises(ClassifierError, match="not a classifier file"):
        load_classifier(path, cfg)


@pytest.mark.parametrize("r", ["2", float("nan"), float("inf"), None, True, 0.5])
def test_unified_r_must_be_a_finite_number_of_at_least_one(r):
    from skip.unified import kept_layers
    with pytest.raises(ValueError, match="must be a finite number >= 1"):
        kept_layers(30, r)


@pytest.mark.parametrize("args, match", [
    (["--time-n", "-1"], "--time-n >= 0"), (["--features", "gapp"], "invalid choice: 'gapp'"),
    (["--tasks", "sst3"], "--tasks 'sst3'"), (["--tasks", "antonym:x"], "--tasks 'antonym:x'"),
    (["--tau", "nan"], "0 <= --tau <= 1")])
def test_eval_adainfer_refuses_bad_arguments_before_loading_anything(args, match, capsys):
    from skip.harness.eval_adainfer import main
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_eval_adainfer_time_n_zero_times_nothing_and_says_so():
    from skip.harness.eval_adainfer import table, wall_clock
    assert wall_clock(None, [], None, None) is None
    s = {"accuracy": 0.5, "flops_ratio": 0.5, "layers_ratio": 0.5, "wall_clock_ratio": None}
    row = {"task": "t", "shots": 0, "mode": "full", "full_accuracy": 1.0, "svm": s, "threshold": s, "oracle": s}
    assert "| 50.0 / 0.50 / 0.50 / - | not fitted |" in table([row], 0.8)
