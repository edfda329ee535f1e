"""Outputs (weights/files.py): nothing is lost or left half-written under any kill or race, an
output of another kind is never replaced, and a single file is written only as a regular file.
Whole commands killed, and what a command reads: tests/test_command_outputs.py."""
import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

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
