"""Outputs (weights/files.py): nothing is lost or left half-written under any kill or race, a
command never replaces what it reads, and a single file is written only as a regular file."""
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import load_model
from weights.convert import ConvertError, convert
from weights.files import OutputExists, atomic_dir, atomic_file, sweep, write_text_atomic

from skip import ROOT



def write(out, word):
    """A complete output: done.json (the marker) and WORD.txt holding word."""
    with atomic_dir(out, "done.json") as tmp:
        (tmp / f"{word}.txt").write_text(word)
        (tmp / "done.json").write_text("{}")


def content(out):
    return {p.name: p.read_text() for p in out.iterdir()} if out.exists() else None


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- folders, killed at any moment
WRITER = """
import sys, time
from pathlib import Path
from weights.files import atomic_dir
with atomic_dir(Path(sys.argv[1]), "done.json") as tmp:
    (tmp / "part.bin").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
    (tmp / "done.json").write_text("{}")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_write_killed_midway_leaves_nothing_partial_and_the_next_run_succeeds(tmp_path, sig):
    out = tmp_path / "out"
    # SIGINT at its default in the child, even when the suite runs in the background (where a shell
    # starts it ignored and Python then never raises KeyboardInterrupt)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(sig)
    p.wait(timeout=30)
    assert not out.exists()
    if sig != signal.SIGKILL:  # a handled signal cleans up at once
        assert not list(tmp_path.glob(".out.partial-*"))
    with atomic_dir(out, "done.json") as tmp:  # SIGKILL's leftover is swept here: its process is gone
        (tmp / "done.json").write_text("{}")
    assert (out / "done.json").exists() and not list(tmp_path.glob(".out.partial-*"))


# Writes NEW.txt over an output, pausing (until a line on stdin) at a chosen moment: stage 0 while
# the files are written, stage k just after the k-th rename of the move-in (1: the old output moved
# aside, 2: the new one moved in, 3: the old one renamed for deletion).
PAUSING_WRITER = """
import os, sys
from pathlib import Path
from weights.files import atomic_dir
stage, renames, rename = int(sys.argv[2]), [], os.rename

def pause():
    print("paused", flush=True)
    sys.stdin.readline()

def pausing_rename(src, dst):
    rename(src, dst)
    renames.append(dst)
    if len(renames) == stage:
        pause()
os.rename = pausing_rename
with atomic_dir(Path(sys.argv[1]), "done.json") as tmp:
    (tmp / "new.txt").write_text("new")
    if stage == 0:
        pause()
    (tmp / "done.json").write_text("{}")
"""


def start_paused(out, stage):
    p = subprocess.Popen([sys.executable, "-c", PAUSING_WRITER, str(out), str(stage)], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "paused\n"
    return p


def resume(p):
    p.stdin.write("\n")
    p.stdin.flush()
    return p.wait(timeout=60)


OLD, NEW = {"done.json": "{}", "old.txt": "old"}, {"done.json": "{}", "new.txt": "new"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_replacement_killed_at_any_moment_leaves_the_old_or_the_new_output_complete(tmp_path, stage, sig):
    out = tmp_path / "out"
    write(out, "old")
    p = start_paused(out, stage)
    p.send_signal(sig)
    if sig == signal.SIGTERM:  # SIGTERM during the move-in waits until the new output is in place
        assert resume(p) == 128 + sig
        assert content(out) == (OLD if stage == 0 else NEW) and leftovers(tmp_path) == []
    else:
        assert p.wait(timeout=60) == -sig
        expected = OLD if stage <= 1 else NEW  # killed between the two renames: the old one goes back
        aside = [tmp_path / n for n in leftovers(tmp_path) if n.startswith(".out.old-")]
        assert content(out) == (None if stage == 1 else expected)
        assert [content(a) for a in aside] == ([OLD] if stage in (1, 2) else [])  # complete, aside
        sweep(out)  # what the next write does first
        assert content(out) == expected and leftovers(tmp_path) == []
    write(out, "next")
    assert content(out) == {"done.json": "{}", "next.txt": "next"} and leftovers(tmp_path) == []


LOOPING_WRITER = """
import sys
from pathlib import Path
from weights.files import atomic_dir
for i in range(10_000):
    with atomic_dir(Path(sys.argv[1]), "done.json") as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text(str(i) * 10_000)
        (tmp / "done.json").write_text(str(i))
    print(i, flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_output_rewritten_in_a_loop_and_killed_anywhere_is_always_one_complete_write(tmp_path, sig):
    out = tmp_path / "out"
    for n in (1, 7, 30):  # a kill lands somewhere in the next writes, wherever the loop has got to
        p = subprocess.Popen([sys.executable, "-c", LOOPING_WRITER, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
        for _ in range(n):
            p.stdout.readline()
        p.send_signal(sig)
        p.wait(timeout=60)
        sweep(out)
        i = (out / "done.json").read_text()
        assert content(out) == {"done.json": i, **{name: i * 10_000 for name in "abc"}}
        assert leftovers(tmp_path) == []


RACING_WRITER = """
import sys
from pathlib import Path
from weights.files import atomic_dir
for i in range(int(sys.argv[3])):
    with atomic_dir(Path(sys.argv[1]), "done.json") as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text(sys.argv[2] * 10_000)
        (tmp / "done.json").write_text(sys.argv[2])
"""


def test_writers_racing_to_one_output_each_end_complete(tmp_path):
    """Six processes rewrite one output at once: each ends with status 0 (its output was in place at
    some moment), and what stays is one writer's complete output with nothing left beside it."""
    out = tmp_path / "out"
    ps = [subprocess.Popen([sys.executable, "-c", RACING_WRITER, str(out), str(w), "30"], cwd=ROOT,
                           stderr=subprocess.PIPE, text=True) for w in range(6)]
    errs = [p.communicate(timeout=120)[1] for p in ps]
    assert [p.returncode for p in ps] == [0] * 6, errs
    w = (out / "done.json").read_text()
    assert content(out) == {"done.json": w, **{n: w * 10_000 for n in "abc"}} and leftovers(tmp_path) == []


def test_writers_to_look_alike_names_never_delete_each_others_temporaries(tmp_path):
    names = ["t1", "t[1]", "t*", "t?", "t1.partial-1"]
    killed = start_paused(tmp_path / "t1", 0)
    killed.kill()
    killed.wait(timeout=60)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(f".t1.partial-{killed.pid}-")
    live = {n: start_paused(tmp_path / n, 0) for n in names}
    temps = {n: [t for t in leftovers(tmp_path) if t.startswith(f".{n}.partial-{p.pid}-")] for n, p in live.items()}
    assert all(len(t) == 1 for t in temps.values())
    for n in names:  # each write sweeps the dead temporaries of its own name, and only those
        write(tmp_path / n, "mine")
        assert content(tmp_path / n) == {"done.json": "{}", "mine.txt": "mine"}
    assert leftovers(tmp_path) == sorted(t for ts in temps.values() for t in ts)
    assert all(resume(p) == 0 for p in live.values())
    assert all(content(tmp_path / n) == NEW for n in names) and leftovers(tmp_path) == []


def test_only_exact_names_of_dead_writers_are_swept(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    (tmp_path / "out").mkdir()
    swept = [f".out.partial-{dead}-0123abcd", f".out.old-{dead}-89abcdef"]
    kept = [f".out.partial-{alive}-0123abcd", f".out.old-{alive}-0123abcd",  # a live writer's
            f".out.partial-{dead}-0123abcg", f".out.partial-{dead}-0123abc", f".out.partial-x{dead}-0123abcd",
            f".out.partial-{dead}-0123abcd.x", f".out.x.partial-{dead}-0123abcd", f".ou.partial-{dead}-0123abcd",
            f".out.partial-1.partial-{dead}-0123abcd", f".o*.partial-{dead}-0123abcd", "out.partial-9-0123abcd"]
    for name in swept + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    sweep(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out"])


def test_a_missing_output_is_restored_from_a_dead_writers_aside_copy(tmp_path):
    aside = tmp_path / f".out.old-{dead_pid()}-0123abcd"
    aside.mkdir()
    (aside / "mine.txt").write_text("mine")  # no marker: a folder replaced with --force is restored too
    sweep(tmp_path / "out")
    assert content(tmp_path / "out") == {"mine.txt": "mine"} and leftovers(tmp_path) == []


# ---------------------------------------------------------------- folders: what may be replaced
def test_convert_refuses_a_folder_it_did_not_write(smollm2_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="was not written by this command"):
        convert(smollm2_gguf, tmp_path / "out", log=lambda *a: None)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_an_adapter_or_trace_folder_is_never_replaced_by_another_kind(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "adapter.json").write_text("{}")
    with pytest.raises(OutputExists), atomic_dir(tmp_path / "t", "trace.json") as tmp:
        (tmp / "trace.json").write_text("{}")
    assert (tmp_path / "t" / "adapter.json").exists() and not list(tmp_path.glob(".t.partial-*"))
    with atomic_dir(tmp_path / "t", "trace.json", force=True) as tmp:  # --force replaces it
        (tmp / "trace.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["trace.json"]


def test_an_output_without_its_marker_is_not_moved_into_place(tmp_path):
    with pytest.raises(RuntimeError, match="done.json was not written"), atomic_dir(tmp_path / "o", "done.json") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def main_of(module):
    import importlib
    m = importlib.import_module(module)
    return m.main if hasattr(m, "main") else importlib.import_module(module + ".__main__").main


def test_a_command_never_replaces_the_folder_it_reads_force_or_not(llama_dir, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(llama_dir, model)
    (model / "x.gguf").write_bytes(b"GGUF, refused before it is read")
    (tmp_path / "link").symlink_to(model)
    before = snapshot(tmp_path)
    calls = [  # (module, arguments): --out is the input, holds it, or is another name of it
        ("skip.trace", "write", "--model", model, "--prompt", "x", "--out", model, "--force"),
        ("skip.trace", "write", "--model", model, "--prompt", "x", "--out", tmp_path, "--force"),
        ("skip.trace", "write", "--model", model, "--prompt", "x", "--out", tmp_path / "link", "--force"),
        ("skip.trace", "write", "--model", tmp_path / "link", "--prompt", "x", "--out", model, "--force"),
        ("skip.trace", "write", "--model", llama_dir, "--method", "kangaroo", "--settings",
         json.dumps({"adapter": str(model)}), "--prompt", "x", "--out", model, "--force"),
        ("weights", "convert", model / "x.gguf", "--out", model, "--force"),
        ("weights", "convert", model / "x.gguf", "--out", model),
        ("skip.kangaroo_official", model / "x.gguf", "--l", "1", "--model", llama_dir, "--out", model, "--force"),
        ("skip.kangaroo_official", tmp_path / "a", "--l", "1", "--model", model, "--out", model, "--force"),
        ("skip.train.finetune", "--model", model, "--out", model, "--force"),
        ("skip.train.kangaroo", "--model", model, "--out", model, "--force"),
    ]
    for module, *args in calls:
        with pytest.raises(SystemExit) as e:
            main_of(module)(list(map(str, args)))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "which this command reads" in err, (args, err)
        assert snapshot(tmp_path) == before and (tmp_path / "link").is_symlink()
    for module, *args in calls[0], calls[5]:  # the same as whole processes: one line, status 2
        p = run_cli(module, *args)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert snapshot(tmp_path) == before
    load_model(model)


# ---------------------------------------------------------------- single files
def test_a_single_file_is_written_only_as_a_regular_file(tmp_path):
    node = tmp_path / "null"  # a copy of /dev/null (same device numbers), so a failure cannot break the machine's
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:  # not root: /dev/null itself, which only root could replace
        node = Path("/dev/null")
    rdev = node.stat().st_rdev
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, target in (("to-node", node), ("to-fifo", tmp_path / "fifo"), ("to-nothing", tmp_path / "none")):
        (tmp_path / name).symlink_to(target)
    for path, match in ((node, "is a character device"), (tmp_path / "fifo", "is a FIFO"),
                        (tmp_path / "dir", "is a directory"), (tmp_path / "to-node", "link .* is a character device"),
                        (tmp_path / "to-fifo", "link .* is a FIFO"), (tmp_path / "to-nothing", "link .* is missing")):
        with pytest.raises(OutputExists, match=match):
            write_text_atomic(path, "x")
        with pytest.raises(OutputExists, match=match), atomic_file(path) as tmp:
            tmp.write_text("x")
    assert stat.S_ISCHR(node.stat().st_mode) and node.stat().st_rdev == rdev
    assert stat.S_ISFIFO((tmp_path / "fifo").stat().st_mode) and list((tmp_path / "dir").iterdir()) == []
    assert all((tmp_path / n).is_symlink() for n in ("to-node", "to-fifo", "to-nothing"))
    assert not (tmp_path / "none").exists() and leftovers(tmp_path) == []


def test_a_single_file_through_a_link_replaces_the_linked_file_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "r.json"
    real.write_text("old")
    real.chmod(0o640)
    (tmp_path / "link.json").symlink_to(real)
    write_text_atomic(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640 and leftovers(tmp_path / "real") == []


def test_the_trace_show_cli_refuses_a_device_as_its_picture_in_one_line(llama_dir, tmp_path, capsys):
    from skip.trace.methods import trace
    m = load_model(llama_dir)
    trace(m, [3, 14, 15], tmp_path / "t", "full", max_new_tokens=2)
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        node = Path("/dev/null")
    with pytest.raises(SystemExit) as e:
        main_of("skip.trace")(["show", str(tmp_path / "t"), "--out", str(node)])
    assert e.value.code == 2 and "is not a regular file" in capsys.readouterr().err
    assert stat.S_ISCHR(node.stat().st_mode)


def test_the_trace_show_cli_replaces_only_a_picture_and_nothing_it_reads(llama_dir, tmp_path, capsys):
    """--out at the trace's own trace.json, a model's config.json or any user file: one line,
    status 2, the file as it was; at a folder it reads: refused; at an old picture: replaced."""
    from skip.trace.methods import trace
    trace(load_model(llama_dir), [3, 14, 15], tmp_path / "t", "full", max_new_tokens=2)
    (tmp_path / "notes.txt").write_text("mine")
    targets = [tmp_path / "t" / "trace.json", llama_dir / "config.json", tmp_path / "notes.txt"]
    before = {p: p.read_bytes() for p in targets}
    for out, said in [*((p, "is not a PNG picture") for p in targets), (tmp_path / "t", "is not a regular file")]:
        with pytest.raises(SystemExit) as e:
            main_of("skip.trace")(["show", str(tmp_path / "t"), "--model", str(llama_dir), "--out", str(out)])
        assert e.value.code == 2 and said in capsys.readouterr().err, out
    assert {p: p.read_bytes() for p in targets} == before
    for _ in range(2):  # a new picture, then the picture replaced
        main_of("skip.trace")(["show", str(tmp_path / "t"), "--out", str(tmp_path / "t.png")])
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- whole commands killed
def kill_while_writing(cmd, out, sig=signal.SIGTERM):
    """Start cmd, send sig once its temporary output folder holds a file, wait for it to end."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(f.is_file() for d in out.parent.glob(f".{out.name}.partial-*") for f in d.iterdir()):
        assert p.poll() is None, f"{cmd} ended before it wrote anything"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.send_signal(sig)
    return p.wait(timeout=60)


# Killed mid-write, a command leaves its folder exactly as before it started (empty), so the next
# run starts as a first run does; that a first run completes is every other test of these commands
# (the session's conversion of SmolLM2, tests/test_devices.py's fine-tunes). The two writers of the
# largest files, each killed (one real process each), on a model wide enough (200 MB of tensors)
# that the kill lands while its tensors are written, yet cheap to run: a few thin layers over
# SmolLM2's tokenizer, its tensors written directly (random, no initialisation). V: a smaller
# vocabulary (a GGUF's token list is parsed token by token; the fine-tune needs the tokenizer's).
def wide_model(path, smollm2_dir, d=512, f=64, L=4, V=None):
    from safetensors.torch import save_file
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    cfg.update(hidden_size=d, intermediate_size=f, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
               head_dim=d // 4, tie_word_embeddings=False, vocab_size=V or cfg["vocab_size"])
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    V, kv = cfg["vocab_size"], d // 2
    shapes = {"model.embed_tokens.weight": (V, d), "lm_head.weight": (V, d), "model.norm.weight": (d,)}
    for i in range(L):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in {
            "input_layernorm": (d,), "post_attention_layernorm": (d,), "self_attn.q_proj": (d, d),
            "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, d),
            "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}.items()})
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()},
              path / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


def test_a_conversion_killed_mid_write_leaves_nothing_behind(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from test_families import write_gguf
    hf = AutoModelForCausalLM.from_pretrained(wide_model(tmp_path / "m", smollm2_dir, d=2048, L=1, V=8192))
    write_gguf(hf, "llama", tmp_path / "wide.gguf")
    shutil.rmtree(tmp_path / "m")
    out = tmp_path / "wide"
    cmd = [sys.executable, "-m", "weights", "convert", str(tmp_path / "wide.gguf"), "--out", str(out)]
    assert kill_while_writing(cmd, out) != 0
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["wide.gguf"]


def test_a_fine_tune_killed_mid_write_leaves_nothing_behind(smollm2_dir, data_dir, tmp_path):
    model = wide_model(tmp_path / "wide", smollm2_dir)
    out = tmp_path / "unified-2x"
    cmd = [sys.executable, "-m", "skip.train.finetune", "--model", str(model), "--steps", "1",
           "--max-tokens", "64", "--out", str(out)]
    assert kill_while_writing(cmd, out) != 0
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["wide"]


def test_a_full_disk_while_writing_names_the_output_and_leaves_the_old_one(tmp_path):
    from model.cli import bad_input
    write(tmp_path / "out", "old")
    for make in (lambda: atomic_dir(tmp_path / "out", "done.json"), lambda: atomic_file(tmp_path / "f.txt")):
        with pytest.raises(OSError) as e:
            with make():
                raise OSError(errno.ENOSPC, "No space left on device")  # as a write into the temporary raises
        assert e.value.filename.endswith(("out", "f.txt")) and bad_input(e.value)  # one line, status 2
    assert content(tmp_path / "out") == {"done.json": "{}", "old.txt": "old"} and leftovers(tmp_path) == []
    assert not (tmp_path / "f.txt").exists()
