"""Traces of batched runs (skip/trace/batch.py): each row of a batch folder against the unbatched
trace of its prompt (the oracle), a tampered row found and named by its row and step, and
garbage batch folders refused with status 2."""
import json
import shutil

import pytest

from model import load_model
from skip.adainfer import Threshold
from skip.adainfer_files import save_classifier
from skip.kangaroo_files import save_adapter
from skip.trace.__main__ import main
from skip.trace.methods import QUEUED, trace
from skip.trace.batch import compare_any, trace_batch
from skip.trace.compare import compare

from conftest import random_adapter, trace_cli, trace_refused

# of different lengths, so that the batch pads them and its rows part ways
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [5, 9], [26, 53, 58, 97 - 1, 32, 38, 46, 26, 43, 38, 32]]
RUNS = {"kangaroo": {"gamma": 3}, "kangaroo_topk": {"gamma": 4, "draft_vocab": 40}, "adainfer": {"tau": 0.05},
        "adainfer_classifier": {}, "full": {}, "unified": {"r": 2}, "skipdecode": {"r": 2}}


@pytest.fixture(scope="module")
def model(llama_dir, tmp_path_factory):
    m = load_model(llama_dir)
    m.cfg.eos_token_id = [63]  # met by row 1 alone, at its third token: it leaves the batch early
    files = tmp_path_factory.mktemp("method_files")
    save_adapter(random_adapter(m, 2, 0, lens_like=True), files / "a")  # drafts as good as the logit lens
    save_classifier(Threshold(0.2, "top_prob"), files / "c.json", m.cfg)
    return m, files


def settings_of(name, files):
    extra = {"kangaroo": {"adapter": str(files / "a")}, "adainfer_classifier": {"classifier": str(files / "c.json")}}
    return {**RUNS[name], **next((v for k, v in extra.items() if name.startswith(k)), {})}


@pytest.fixture(scope="module")
def batches(model, tmp_path_factory):
    """Each run's batch folder, and the unbatched trace of each prompt."""
    m, files = model
    tmp = tmp_path_factory.mktemp("batches")
    for name in RUNS:
        method, s = name.split("_")[0], settings_of(name, files)
        trace_batch(m, PROMPTS, tmp / name, method, 10, s)
        if method in QUEUED:  # two rows: row 1 leaves at its third token, and prompt 2 takes its row
            trace_batch(m, PROMPTS, tmp / f"{name}-queue", method, 10, s, batch_size=2)
        for i, p in enumerate(PROMPTS):
            trace(m, p, tmp / f"{name}-alone-{i}", method, 10, s)
    return tmp


@pytest.mark.parametrize("name", list(RUNS))
def test_every_row_of_a_batch_equals_the_unbatched_trace_of_its_prompt(batches, name, capsys):
    for i in range(len(PROMPTS)):
        row, alone = batches / name / f"row-{i}", batches / f"{name}-alone-{i}"
        notes = []
        assert compare(alone, row, notes=notes) == [], (name, i)
        assert compare(row, alone) == []
        # the batch-level fields are left out of a row, so compare says it did not compare them;
        # Kangaroo's rows record their layer runs at their own slots, which compare checks
        assert notes == ([] if name.startswith("kangaroo") else ["layer runs are in one trace only: not compared"])
        assert json.loads((row / "trace.json").read_text())["flops"] is None
    assert json.loads((batches / name / "batch.json").read_text())["rows"] == len(PROMPTS)
    code, out, _ = trace_cli(capsys, "compare", batches / name, batches / name, "--atol", "0", "--rtol", "0")
    assert code == 0 and out.endswith("the traces agree within the tolerances\n"), out


@pytest.mark.parametrize("name", [n for n in RUNS if n.split("_")[0] in QUEUED])
def test_a_queue_writes_each_prompts_unbatched_trace(batches, name):
    for i in range(len(PROMPTS)):
        assert compare(batches / f"{name}-alone-{i}", batches / f"{name}-queue" / f"row-{i}") == [], (name, i)


def test_the_batch_is_not_trivial(batches):
    """The rows part ways: lengths differ, a row leaves early, rows accept different numbers of drafts
    and exit at different layers."""
    rows = [json.loads((batches / "kangaroo" / f"row-{i}" / "trace.json").read_text()) for i in range(3)]
    assert len({len(r["tokens"]) for r in rows}) > 1
    accepted = [[s["accepted"] for s in r["steps"]] for r in rows]
    assert any(len({a[s] for a in accepted if s < len(a)}) > 1 for s in range(max(map(len, accepted))))
    for name in ("adainfer", "adainfer_classifier"):  # the rows exit at different layers
        exits = [[s["exit_layer"] for s in json.loads((batches / name / f"row-{i}" / "trace.json").read_text())
                  ["steps"]] for i in range(3)]
        assert len({e for row in exits for e in row}) > 1, name


def tampered(batches, tmp_path, name, row, change):
    shutil.copytree(batches / name, tmp_path / "bad")
    path = tmp_path / "bad" / f"row-{row}" / "trace.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    return tmp_path / "bad"


def step_with(meta, key, test):
    return next(s for s, st in enumerate(meta["steps"]) if test(st[key]))


@pytest.mark.parametrize("what", ["token", "draft", "exit_layer"])
def test_a_tampered_row_is_found_and_named_by_its_row_and_step(batches, tmp_path, capsys, what):
    name = "adainfer" if what == "exit_layer" else "kangaroo"
    seen = {}

    def change(meta):
        if what == "token":
            seen["s"], seen["was"] = 2, meta["tokens"][2]
            meta["tokens"][2] = (meta["tokens"][2] + 1) % 97
        elif what == "draft":
            s = seen["s"] = step_with(meta, "drafts", bool)
            seen["was"] = meta["steps"][s]["drafts"][0]
            meta["steps"][s]["drafts"][0] = (seen["was"] + 1) % 97
        else:
            s = seen["s"] = 1  # row 1 meets EOS at its third token: two steps
            seen["was"] = meta["steps"][s]["exit_layer"]
            meta["steps"][s]["exit_layer"] = (seen["was"] + 1) % 4
    bad = tampered(batches, tmp_path, name, 1, change)
    _, found = compare_any(batches / name, bad)
    s, was = seen["s"], seen["was"]
    first = {"token": f"row 1: generated token {s} differs: reference {was}, other {(was + 1) % 97}",
             "draft": f"row 1: step {s} of kangaroo differs at drafts[0]: reference {was}, other {(was + 1) % 97}",
             "exit_layer": f"row 1: step {s} of adainfer differs at exit_layer: reference {was}, other {(was + 1) % 4}"}
    assert found == [first[what]]
    code, out, _ = trace_cli(capsys, "compare", batches / name, bad)
    assert code == 1 and first[what] in out


def broken(batches, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(batches / "full", bad)
    if how == "missing row":
        shutil.rmtree(bad / "row-2")
    elif how == "extra row":
        shutil.copytree(bad / "row-0", bad / "row-3")
    elif how == "row of another run":
        shutil.rmtree(bad / "row-1")
        shutil.copytree(batches / "unified" / "row-1", bad / "row-1")
    elif how == "row not a trace":
        (bad / "row-1" / "trace.json").write_text("[]")
    else:
        meta = json.loads((bad / "batch.json").read_text())
        (bad / "batch.json").write_text({"not json": "{rows", "rows 0": json.dumps({**meta, "rows": 0}),
                                         "rows a string": json.dumps({**meta, "rows": "3"}),
                                         "unknown field": json.dumps({**meta, "size": 3}),
                                         "a list": "[]"}[how])
    return bad


@pytest.mark.parametrize("how", ["missing row", "extra row", "row of another run", "row not a trace", "not json",
                                 "rows 0", "rows a string", "unknown field", "a list"])
def test_a_garbage_batch_folder_is_refused_with_status_2(batches, tmp_path, capsys, how):
    bad = broken(batches, tmp_path, how)
    trace_refused(capsys, "compare", batches / "full", bad)
    trace_refused(capsys, "compare", bad, batches / "full")


def test_a_batch_against_a_single_trace_or_of_another_size_is_refused(batches, model, tmp_path, capsys):
    err = trace_refused(capsys, "compare", batches / "full", batches / "full-alone-0")
    assert "is a batch of traces and" in err
    trace_refused(capsys, "compare", batches / "full-alone-0", batches / "full")
    trace_batch(model[0], PROMPTS[:2], tmp_path / "two", "full", 10)
    assert "the batches hold 3 and 2 rows" in trace_refused(capsys, "compare", batches / "full", tmp_path / "two")


def test_the_command_line_writes_a_batch_whose_rows_equal_single_runs(tiny_chat_dir, tmp_path, capsys):
    args = ["write", "--model", tiny_chat_dir, "--method", "adainfer", "--settings", '{"tau": 0.2}',
            "--max-new-tokens", "4"]
    prompts = ["Name three colours.", "Hi"]
    cli_ok = main([str(a) for a in args + ["--prompt", prompts[0], "--prompt", prompts[1], "--out", tmp_path / "b"]])
    assert cli_ok is None and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["batch.json", "row-0", "row-1"]
    for i, p in enumerate(prompts):
        main([str(a) for a in args + ["--prompt", p, "--out", tmp_path / f"s{i}"]])
        code, out, _ = trace_cli(capsys, "compare", tmp_path / f"s{i}", tmp_path / "b" / f"row-{i}")
        assert code == 0, out
    main([str(a) for a in args + ["--prompt", prompts[1], "--prompt", prompts[0], "--batch-size", "1",
                                  "--out", tmp_path / "q"]])  # a queue through one row
    assert trace_cli(capsys, "compare", tmp_path / "s1", tmp_path / "q" / "row-0")[0] == 0
    assert "queue" in trace_refused(capsys, *args, "--prompt", "a", "--batch-size", "1", "--out", tmp_path / "q1")
    assert "queue" in trace_refused(capsys, "write", "--model", tiny_chat_dir, "--method", "unified", "--prompt", "a",
                                    "--prompt", "b", "--batch-size", "1", "--out", tmp_path / "q2")
    # a batch never replaces a single trace (nor the reverse) unless --force
    trace_refused(capsys, *args, "--prompt", "a", "--prompt", "b", "--out", tmp_path / "s0")
    trace_refused(capsys, *args, "--prompt", "a", "--out", tmp_path / "b")


def test_show_on_a_batch_folder_points_to_its_rows(batches, capsys):
    pytest.importorskip("matplotlib")
    assert "a batch of traces: its rows are" in trace_refused(capsys, "show", batches / "full")
