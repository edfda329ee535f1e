"""Every command ends bad input in one line on stderr and exit status 2, before the slow work,
and never hides a bug: model/cli.py's handler and argparse types, each command's table of bad
inputs (in-process, the model a tiny one), a few real processes (no traceback, no crash), task
files read line by line as JSON defines them, and cache files that are cut short rebuilt."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from model import load_model
from skip import ROOT
from model.cli import command, float_in, int_in, threads, writable_file, writable_folder
from weights.files import OutputExists

from conftest import random_adapter, refused


# ---------------------------------------------------------------- the handler and the types
@pytest.mark.parametrize("exc, said", [
    (ValueError("bad number\n  second line"), "error: bad number second line"),
    (FileNotFoundError(2, "No such file or directory", "/no/such"), "error: /no/such: No such file or directory"),
    (OutputExists("/out exists and was not written by this command"), "error: /out exists and was not"),
    (FileNotFoundError("x has neither tokenizer.json nor tokenizer.model"), "error: x has neither"),
    (json.JSONDecodeError("Expecting value", "{", 1), "error: Expecting value"),
    (SafetensorError("Error while deserializing header"), "error: Error while deserializing header")])
def test_bad_input_ends_in_one_line_and_status_2(exc, said, capsys):
    def main(argv=None):
        raise exc
    assert refused(command(main), [], capsys).startswith(said)


@pytest.mark.parametrize("template, said", [
    ('{{ raise_exception("no system role") }}', "error: chat template: TemplateError: no system role"),
    ("{% for %}", "error: chat template: TemplateSyntaxError: Expected an expression"),
    ('{{ 1 + "a" }}', "error: chat template: TypeError: unsupported operand")])  # raised by the template's code
def test_a_failing_chat_template_is_bad_input(template, said, capsys):
    pytest.importorskip("jinja2")
    from tokenizer import render_chat
    assert refused(command(lambda argv: render_chat(template, [{"role": "user", "content": "hi"}])), [], capsys
                   ).startswith(said)


@pytest.mark.parametrize("bug", [KeyError("k"), TypeError("unsupported operand"), OSError(28, "No space left"),
                                 AttributeError("x")])
def test_anything_else_keeps_its_traceback(bug):  # a bug here, or an OSError that names no input
    def main(argv=None):
        raise bug
    with pytest.raises(type(bug)):
        command(main)([])


def test_number_types_refuse_what_is_out_of_range():
    import argparse
    for parse, bad, good in [(int_in(1), ["0", "-3", "1.5", "x", ""], [("1", 1), ("10", 10)]),
                             (int_in(1, 64), ["65"], [("64", 64)]),
                             (threads, ["0", "100000"], [("1", 1)]),
                             (float_in(0, lo_open=True), ["0", "-1", "nan", "inf", "-inf", "x"], [("1e-9", 1e-9)]),
                             (float_in(0, 1), ["nan", "1.01", "-0.01"], [("0", 0.0), ("1", 1.0)])]:
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)
        assert [parse(text) for text, _ in good] == [v for _, v in good]


def test_outputs_are_checked_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "dir").mkdir()
    (tmp_path / "to_dir").symlink_to(tmp_path / "dir")
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere a permission allows; procfs takes no new folder
        read_only = Path("/proc")
    for path, said in [(tmp_path / "dangling", "is a symbolic link to"), (tmp_path / "file", "exists and is not a folder"),
                       (tmp_path / "file" / "sub", "cannot be written"), (read_only / "sub", "cannot be written")]:
        with pytest.raises(ValueError, match=f"--out {path} {said}"):
            writable_folder(path)
    assert writable_folder(tmp_path / "to_dir") == tmp_path / "to_dir" and writable_folder(tmp_path / "new" / "x").is_dir()
    for path, said in [(tmp_path / "dir", "exists and is not a regular file"), ("/dev/null", "exists and is not a regular"),
                       (tmp_path / "dangling", "is a symbolic link to"),
                       (tmp_path / "file" / "x.json", f": its folder {tmp_path / 'file'} exists and is not a folder"),
                       (read_only / "sub" / "x.json", f": its folder {read_only / 'sub'} cannot be written")]:
        with pytest.raises(ValueError, match=f"--out {path}{'' if said[0] == ':' else ' '}{said}"):
            writable_file(path)
    assert writable_file(tmp_path / "file") == tmp_path / "file"
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------- every command's bad inputs
@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_chat_dir):
    """Files and folders that commands must refuse, and a tiny chat model with an adapter."""
    d = tmp_path_factory.mktemp("bad")
    (d / "file").write_text("x")
    (d / "dangling").symlink_to(d / "nowhere")
    (d / "list.jsonl").write_text('{"prompt": "Q:", "answer": " A"}\n[1, 2]\n')
    (d / "parts").mkdir()
    (d / "parts" / "bench-products.json").write_text("[]")
    adapter = d / "adapter"
    from skip.kangaroo_files import save_adapter
    save_adapter(random_adapter(load_model(tiny_chat_dir), 2, 0, lens_like=True), adapter, force=True)
    return {"dir": d, "model": str(tiny_chat_dir), "adapter": str(adapter)}


# module: [(arguments, what the error line names)]; {dir}, {model}, {adapter} from the fixture
CASES = {
    "skip.harness.eval_adainfer": [
        (["--threads", "0"], "--threads: 0 is not in 1.."), (["--threads", "100000"], "--threads: 100000"),
        (["--model", "{model}", "--tasks", "{dir}/list.jsonl", "--n-train", "1", "--n-test", "1"],
         "list.jsonl, line 2: expected a JSON object, got an array"),
        (["--model", "{model}", "--tasks", "antonym:5", "--n-train", "2"], "--tasks antonym: 5 shots need 5 train"),
        (["--tasks", "antonym", "--out", "{dir}/dangling"], "--out {dir}/dangling is a symbolic link to"),
        (["--tasks", "antonym", "--out", "{dir}/file"], "--out {dir}/file exists and is not a folder")],
    "skip.harness.bench": [
        (["--summary-only", "--out", "{dir}/file"], "is not a folder"),
        (["--summary-only", "--out", "{dir}/parts", "--parts", "products"],
         "bench-products.json: expected a JSON object, got list")],
    "skip.harness.bench_cost": [
        (["--r", "0.5"], "--r: 0.5 is not a finite number in [1, inf)"), (["--max-new-tokens", "1"], "--max-new-tokens"),
        (["--threads", "0"], "--threads"), (["--model", "{model}", "--r", "5"], "need --r <= 4")],
    "skip.harness.bench_exits": [
        (["--batches", "2", "2"], "--batches lists a size twice: 2 2"), (["--batches", "0"], "--batches: 0"),
        (["--batches", "100000"], "--batches 100000: the Spec-Bench pool holds"),
        (["--batches", "100000", "--top-k", "0"], "one batch of the largest size must fit"),
        (["--batches", "4", "--queue", "2"], "--queue 2: fewer prompts than --batches 4 rows")],
    "skip.harness.bench_decoder": [
        (["--runs", "0"], "--runs: 0 is not >= 1"), (["--model", "{model}", "--out", "{dir}"], "is not a regular file"),
        (["--model", "{model}", "--out", "{model}/config.json"], "is not a result file of this project's"),
        (["--model", "{model}", "--out", "{dir}/file"], "is not a result file of this project's")],
    "skip.harness.bench_kangaroo": [
        (["--eta", "nan"], "--eta: nan"), (["--gamma", "-1"], "--gamma"), (["--threads", "100000"], "--threads"),
        (["--repeats", "0"], "--repeats"), (["--out", "{dir}/file"], "is not a folder"),
        (["--batch", "4", "4"], "--batch lists a size twice: 4 4"),
        (["--batch", "100000", "--prompts", "100000"], "--prompts 100000: the Spec-Bench pool holds"),
        (["--policy", "batch_stop"], "a policy of the batch, for --batch"),
        (["--batch", "2", "--policy", "batch_k"], "--policy batch_k drafts a fixed k without eta: give --eta 0"),
        (["--batch", "2", "--pool", "2"], "--batch and --pool are two benchmarks"),
        (["--pool", "2", "2"], "--pool and --policies list each size and policy once"),
        (["--pool", "2", "--prompts", "100000"], "--prompts 100000: the Spec-Bench pool holds"),
        (["--model", "{model}", "--adapter", "{adapter}", "--top-k", "60000", "--out", "{dir}/k"],
         "--top-k 60000: the adapter in {adapter} ranks 49152 tokens")],
    "skip.harness.bench_products": [
        (["--rows", "0"], "--rows: 0 is not in 1..64"), (["--rows", "1", "100000"], "--rows"),
        (["--threads", "100000"], "--threads"), (["--runs", "0"], "--runs")],
    "skip.harness.bench_skipping": [
        (["--r", "0"], "--r: 0"), (["--batches", "0"], "--batches"), (["--beams", "-1"], "--beams"),
        (["--n-quality", "1"], "--n-quality must be at least 2"),
        (["--model", "{model}", "--r", "5", "--out", "{dir}/s"], "need --r <= 4")],
    "skip.harness.demo": [
        (["--threads", "0"], "--threads"), (["--tasks", "antonym"], "--tasks antonym: the demo scores over answer"),
        (["--tasks", "sst9"], "unknown task 'sst9'"), (["--json", "{dir}"], "--json {dir} exists and is not a regular"),
        (["--model", "{model}", "--json", "{model}/config.json"], "is not a result file of this project's"),
        (["--model", "{model}", "--adapter", "{dir}/nowhere", "--tasks", "{dir}/list.jsonl"], "list.jsonl, line 2")],
    "skip.harness.eval_adainfer_gen": [
        (["--tau", "nan"], "--tau: nan"), (["--n-train", "0"], "--n-train"), (["--max-new", "1"], "--max-new"),
        (["--out", "{dir}/file"], "is not a folder")],
    "skip.train.finetune": [
        (["--steps", "0"], "--steps: 0 is not >= 1"), (["--minutes", "0"], "--minutes: 0 is not a finite number in (0"),
        (["--minutes", "inf"], "--minutes: inf"), (["--lr", "nan"], "--lr: nan"), (["--lora", "0"], "--lora"),
        (["--seed", "-1"], "--seed: -1"), (["--model", "{model}", "--r", "5", "--out", "{dir}/f"], "--r 5: target speedup"),
        (["--model", "{model}", "--max-tokens", "10", "--out", "{dir}/f"], "--max-tokens 10: need 38")],
    "skip.train.kangaroo": [
        (["--l", "0"], "--l: 0 is not >= 1"), (["--batch", "0"], "--batch"), (["--steps", "0"], "--steps"),
        (["--minutes", "0"], "--minutes"), (["--held-out", "0"], "--held-out"),
        (["--prompts", "5", "--held-out", "5"], "--prompts 5 less --held-out 5 leaves 0 training sequences"),
        (["--model", "{model}", "--l", "4", "--out", "{dir}/a"], "--l 4: the exit layer must be in 1..3"),
        (["--model", "{model}", "--prompts", "6", "--held-out", "1", "--new-tokens", "5000", "--out", "{dir}/a"],
         "--new-tokens 5000")],
    "model.__main__": [
        (["generate", "--model", "{dir}/nowhere", "--prompt", "hi"], "no model at {dir}/nowhere"),
        (["generate", "--model", "{model}", "--prompt", "hi", "--seed", "-1"], "--seed: -1"),
        (["generate", "--model", "{model}", "--prompt", "hi", "--device", "cuda:99"], "not available on this machine"),
        (["demo", "--model", "{dir}/file"], "no model at {dir}/file")],
}


@pytest.mark.parametrize("module", list(CASES))
def test_every_command_refuses_bad_input_in_one_line_with_status_2(module, bad, data_dir, capsys, monkeypatch):
    mod = importlib.import_module(module)
    if hasattr(mod, "CACHE"):
        monkeypatch.setattr(mod, "CACHE", bad["dir"] / "cache")  # nothing into runs/
    for args, said in CASES[module]:
        argv = [a.format(**bad) for a in args]
        last = refused(mod.main, argv, capsys)
        assert said.format(**bad) in last, (argv, last)
    assert not (bad["dir"] / "cache").exists()  # each refused before the slow work


def test_a_failing_chat_template_ends_the_command_in_one_line(tiny_chat_dir, tmp_path, capsys):
    import shutil
    from model.__main__ import main
    shutil.copytree(tiny_chat_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0].content + 1 }}"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "chat template: TypeError" in refused(main, ["generate", "--model", str(tmp_path / "m"), "--prompt", "hi"],
                                                 capsys)


# Two real processes: the status, one error line, and no traceback or crash (a segfault at
# --threads 100000 before), each refused before any model loads or any data is read; the tables
# above run every command's refusals in-process.
PROCESSES = [
    (["skip.harness.bench_products", "--threads", "100000"], "--threads: 100000 is not in 1.."),
    (["skip.harness.eval_adainfer", "--tasks", "{dir}/list.jsonl", "--out", "{dir}/o"], "list.jsonl, line 2"),
]


def test_real_processes_end_bad_input_in_one_line_with_status_2(bad):
    for args, said in PROCESSES:
        argv = [a.format(**bad) for a in args]
        p = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (argv, p.stderr)
        assert said.format(**bad) in p.stderr.strip().splitlines()[-1], (argv, p.stderr)


# ---------------------------------------------------------------- task files
def test_a_task_file_is_split_at_newlines_only(tmp_path):
    """U+2028, U+0085, U+000B and the other line breaks of str.splitlines() are ordinary
    characters inside a JSON string."""
    from skip.harness.tasks import from_jsonl
    prompts = [f"Q{i}: a\u2028b\u0085c\u000bd\u001ce\u2029f\x0cg\r" for i in range(4)]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "answer": " A"}, ensure_ascii=False) + "\n" for p in prompts),
                 encoding="utf-8")
    task = from_jsonl(f, n_train=2, n_test=2)
    assert sorted(i.prompt for i in task.train + task.test) == sorted(prompts)
    f.write_bytes(b'{"prompt": "Q:", "answer": " \xff"}\n')
    with pytest.raises(ValueError, match="t.jsonl: not UTF-8 text"):
        from_jsonl(f)


# ---------------------------------------------------------------- caches and budgets
def cut_short(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@torch.no_grad()
def test_a_cut_short_adainfer_cache_is_rebuilt(llama_dir, tmp_path, monkeypatch, capsys):
    from skip.adainfer import trace
    from skip.harness import eval_adainfer
    monkeypatch.setattr(eval_adainfer, "CACHE", tmp_path)
    model = load_model(llama_dir)
    encoded = [([5, 6, 7, 8], 9, None), ([3, 4], 10, None)]
    fresh = [trace(model, ids, ans) for ids, ans, _ in encoded]
    eval_adainfer.traces_of(model, "tag", encoded, lambda c: None)
    [path] = tmp_path.glob("*.safetensors")
    def other_traces(p):  # a whole file, of one trace
        save_file({"feats": fresh[0].feats[None], "top1": torch.tensor([fresh[0].top1]), "answer": torch.tensor([9])},
                  str(p))
    for spoil in (cut_short, lambda p: p.write_text("{}"), other_traces):
        spoil(path)
        again = eval_adainfer.traces_of(model, "tag", encoded, lambda c: None)
        assert "warning: rebuilding the unreadable cache file" in capsys.readouterr().err
        assert [(t.feats.tolist(), t.top1, t.answer) for t in again] == [(t.feats.tolist(), t.top1, t.answer)
                                                                          for t in fresh]
    assert eval_adainfer.traces_of(model, "tag", encoded, lambda c: None)[0].top1 == fresh[0].top1
    assert capsys.readouterr().err == ""  # the rebuilt file is read again without a warning


def test_cut_short_kangaroo_training_caches_are_rebuilt(llama_dir, tmp_path, capsys):
    from skip.train.kangaroo import exit_states, self_distill
    model = load_model(llama_dir).requires_grad_(False)
    prompts, answers, states = [[5, 6, 7], [8, 9]], tmp_path / "answers.json", tmp_path / "states.safetensors"
    seqs = self_distill(model, prompts, 4)
    ref = exit_states(model, seqs, 2)
    self_distill(model, prompts, 4, path=answers)
    exit_states(model, seqs, 2, path=states)
    for spoil in (cut_short, lambda p: p.write_text(json.dumps([{"prompt": 1, "ids": [1, 2]}] * 2))):
        spoil(answers)
        assert self_distill(model, prompts, 4, path=answers) == seqs
        assert "warning: rebuilding the unreadable cache file" in capsys.readouterr().err
    cut_short(states)
    again = exit_states(model, seqs, 2, path=states)
    assert "warning: rebuilding" in capsys.readouterr().err
    assert all(torch.equal(a, b) for x, y in zip(again, ref) for a, b in zip(x, y))
    assert self_distill(model, prompts, 4, path=answers) == seqs and capsys.readouterr().err == ""


def test_a_time_budget_smaller_than_one_step_still_takes_one(llama_dir):
    from skip.train.finetune import finetune, response_layer_sets
    from skip.train.kangaroo import train
    model = load_model(llama_dir)
    pairs = [([5, 6, 7], [8, 9, 10])]
    assert len(finetune(model, pairs, response_layer_sets("unified", 4, 2), 5, minutes=1e-12)) == 1
    model.requires_grad_(False)
    adapter = random_adapter(model, 2, 0, lens_like=False)
    seqs = [{"prompt": 3, "ids": [5, 6, 7, 8, 9, 10]}] * 2
    with torch.no_grad():
        h = model.run_layers(model.embed_tokens(torch.tensor([seqs[0]["ids"]]), torch.arange(6)[None]),
                             torch.arange(6)[None], range(2))[0]
    states = [(h, h)] * 2
    for recipe in ("project", "official"):
        assert len(train(model, adapter, states, seqs, [0, 1], 5, minutes=1e-12, batch=1, recipe=recipe)) == 1


# ---------------------------------------------------------------- an output that cannot be written
def test_a_full_device_or_a_closed_pipe_on_stdout_is_one_line_and_status_2(llama_dir, tiny_chat_dir, tmp_path):
    """(argparse's --help swallows its own write errors and exits 0: not a traceback either.)"""
    from skip.trace.methods import trace
    trace(load_model(llama_dir), [3, 14, 15], tmp_path / "t", "full", max_new_tokens=2)
    commands = [["skip.trace", "compare", str(tmp_path / "t"), str(tmp_path / "t")],
                ["model", "generate", "--model", str(tiny_chat_dir), "--prompt", "hi", "--max-new-tokens", "2"]]
    for argv in commands:
        with open("/dev/full", "w") as full:
            p = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=120)
        assert p.returncode == 2 and p.stderr == "error: cannot write the output: No space left on device\n", \
            (argv, p.stderr)
    p = subprocess.Popen([sys.executable, "-m", *commands[0]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    p.stdout.close()  # the reader went away before the first line
    err = p.stderr.read()
    assert p.wait(timeout=120) == 2 and err == "error: cannot write the output: Broken pipe\n", err
