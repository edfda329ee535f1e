"""Writing outputs so that nothing is lost and nothing is left half-written.

A directory output (converted weights, a fine-tuned checkpoint, an adapter, a trace) is built in
a hidden temporary sibling `.NAME.partial-PID-*`, finished by a marker file written last, and
moved into place at the end. An existing directory is replaced only if it is empty or holds that
marker (a complete output of the same command), or with force=True; anything else is refused,
so a typo in --out never deletes a folder this project did not write. On an error, SIGINT or
SIGTERM the temporary is removed; temporaries left by a killed process (its PID is gone) are
swept on the next write next to them. A single-file output is written to a sibling and renamed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class OutputExists(FileExistsError):
    pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


def sweep(out: Path):
    """Remove the temporaries of `out` whose writing process no longer exists."""
    for tmp in out.parent.glob(f".{out.name}.partial-*"):
        pid = tmp.name[len(f".{out.name}.partial-"):].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def check_target(out: Path, marker: str, force: bool):
    """Refuse an existing output that this command did not complete (unless force)."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file() and not force:
        raise OutputExists(f"{out} exists and was not written by this command (no {marker}); "
                           "choose another output, or pass --force to replace it")


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM raises SystemExit, so the cleanup below runs (as it does for SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def atomic_dir(out, marker, force=False):
    """with atomic_dir(out, "done.json") as tmp: write every file into tmp, the marker last."""
    out = Path(out)
    check_target(out, marker, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    with _terminate_as_exit():
        try:
            yield tmp
            if not (tmp / marker).is_file():
                raise RuntimeError(f"{marker} was not written: {out} would be incomplete")
            if out.exists():
                shutil.rmtree(out)  # empty, complete from the same command, or force
            tmp.chmod(0o755)  # mkdtemp makes it private
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(path):
    """with atomic_file(path) as tmp: write tmp; it then replaces path, so a reader sees the old
    file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path, text):
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def cache_key(model_dir, data_files, *args):
    """What determines a cached result: the model's files (weights and config, by content, not
    by folder name), the data files and the arguments."""
    h = hashlib.sha256(repr(args).encode())
    for f in sorted(Path(model_dir).glob("*.safetensors")) + [Path(model_dir) / "config.json"] + list(data_files):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def device_tag(model):
    """What besides the weights changes a model's outputs, for cache keys: nothing for fp32 on the
    CPU (so keys made before other devices and dtypes existed stay valid), else dtype and device."""
    return [] if (model.dtype, model.device.type) == (torch.float32, "cpu") else [str(model.dtype), model.device.type]


def read_folder(path, json_name, tensors_name, error, what, hint=""):
    """(the JSON, the tensors) of a folder that a command here wrote (an adapter, a trace); a
    missing or unreadable file raises error with one line that names the folder."""
    path = Path(path)
    for name in (json_name, tensors_name):
        if not (path / name).is_file():
            raise error(f"no {what} in {path}: {name} is missing{hint}")
    try:
        return json.loads((path / json_name).read_text()), load_file(str(path / tensors_name))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise error(f"{what} in {path} is truncated or corrupted: {e}") from e
