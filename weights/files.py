"""Writing outputs so that nothing is lost and nothing is left half-written.

A directory output NAME (converted weights, a fine-tuned checkpoint, an adapter, a trace) is built
in a hidden temporary sibling `.NAME.partial-PID-TAG` (PID: the writer's process id, TAG: 8 hex
digits), finished by a marker file written last, and then moved into place:
  1. an existing NAME is renamed aside to `.NAME.old-PID-TAG`;
  2. the temporary is renamed to NAME;
  3. the old one is renamed to a fresh `.NAME.partial-PID-TAG` and deleted.
So at every instant a complete output exists: the old one (at NAME, or aside between steps 1 and
2) or the new one. An existing NAME is replaced only if it is empty or holds that marker (a
complete output of the same command), or with force=True; anything else is refused, so a typo in
--out never deletes a folder this project did not write. An output is never a path the command
reads, force or not (check_not_reading). On an error, SIGINT or SIGTERM while the files are
written, the temporary is removed and the old output stays; SIGINT and SIGTERM during steps 1-3
wait until step 3 is done (the new output in place), and an error in step 2 puts the old one back.
Steps 1-3, and the recovery below, hold a lock on NAME's folder (flock on the folder itself, no
file): writers of the same output racing each other move in one after the other, each ending with
its complete output in place, the last one staying.

Recovery (sweep, run by every write before it starts, for the output it writes; only a SIGKILL or
a crash leaves anything for it): the temporaries of NAME are recognised by exact parsing of the
names in NAME's folder (never by a glob built from NAME), and only those whose PID is no longer
running are touched. If NAME is missing and such a `.NAME.old-*` exists (the writer was killed
between steps 1 and 2), it is renamed back to NAME: the killed run did not finish, so the old
output stays. Every other such leftover (a `.partial-*`, complete or not, or an `.old-*` when NAME
exists) is deleted.

A single-file output (atomic_file, write_text_atomic) is written to a `.NAME.partial-*` sibling
and renamed over NAME, so a reader sees the old file or the new one. Only regular files are
written: NAME must be missing or a regular file; a symbolic link to a regular file is written
through (the file it points to is replaced, the link stays); a directory, a device, a FIFO, a
socket, or a link to one of them or to nothing is refused with OutputExists.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path

from safetensors import SafetensorError  # safetensors' core imports no torch; .torch is imported where used

PARTIAL, OLD = "partial", "old"  # the two kinds of temporary beside an output


class OutputExists(FileExistsError):
    pass


# ---------------------------------------------------------------- temporaries and their recovery
def _temporary(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _parse(out: Path, name: str):
    """(kind, pid) if name is exactly a temporary of out, `.NAME.KIND-PID-TAG`, else None."""
    for kind in (PARTIAL, OLD):
        prefix = f".{out.name}.{kind}-"
        if name.startswith(prefix):
            pid, dash, tag = name[len(prefix):].partition("-")
            if pid.isascii() and pid.isdigit() and dash and len(tag) == 8 and all(c in "0123456789abcdef" for c in tag):
                return kind, int(pid)
    return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def sweep(out):
    """Recover what killed writers of out left beside it, as the module docstring says."""
    out = Path(out)
    try:
        names = sorted(os.listdir(out.parent))
    except OSError:  # no folder, so no leftovers
        return
    dead = [(found, out.parent / name) for name in names
            if (found := _parse(out, name)) is not None and not _alive(found[1])]
    if not dead:
        return
    with _folder_lock(out):  # not while a live writer of out is between its two renames
        for (kind, _), path in dead:
            if kind == OLD and not os.path.lexists(out):
                with contextlib.suppress(OSError):
                    os.rename(path, out)  # killed between moving the old output aside and the new one in
            if kind == PARTIAL or os.path.lexists(out):
                _remove(path)


# ---------------------------------------------------------------- what may be written where
def check_not_reading(out, *inputs):
    """Refuse an output that is, or holds, a path the command reads: the input as named, or where
    its symbolic links lead. Compared by device and inode, so another name of a folder is caught."""
    out = Path(out)
    try:
        o = out.stat()
    except OSError:  # nothing there to replace
        return
    for inp in inputs:
        for named in {Path(os.path.abspath(inp)), Path(inp).resolve()}:
            for p in (named, *named.parents):
                try:
                    s = p.stat()
                except OSError:
                    continue
                if (s.st_dev, s.st_ino) == (o.st_dev, o.st_ino):
                    how = "is" if p == named else "holds"
                    raise OutputExists(f"{out} {how} {inp}, which this command reads; choose another output")


def check_target(out, marker: str, force: bool, reads=()):
    """Recover out's leftovers (sweep), then refuse an out that the command reads (reads: its
    inputs) or an existing one that this command did not complete (unless force)."""
    out = Path(out)
    sweep(out)
    check_not_reading(out, *reads)
    try:  # one look at out: another writer of it may move it away meanwhile (then it is not there)
        kind = os.stat(out).st_mode
        names = os.listdir(out) if stat.S_ISDIR(kind) else None
    except FileNotFoundError:
        return
    if names is None:
        raise OutputExists(f"{out} exists and is not a directory")
    if names and marker not in names and not force:
        raise OutputExists(f"{out} exists and was not written by this command (no {marker}); "
                           "choose another output, or pass --force to replace it")


KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def file_target(path) -> Path:
    """The regular file a single-file output at path replaces: path, or the file a symbolic link
    there points to; anything else there raises OutputExists (module docstring)."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = target.stat().st_mode
    except OSError:  # missing, or a loop of links
        mode = None
    if mode is None and target is path:
        return path
    if mode is None or not stat.S_ISREG(mode):
        what = "missing" if mode is None else KINDS.get(stat.S_IFMT(mode), "not a regular file")
        via = f"{path} is a symbolic link to {target}, which is" if target is not path else f"{path} is"
        raise OutputExists(f"{via} {what}; a file is written only as a regular file, choose another output")
    return target


# ---------------------------------------------------------------- writing
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
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block is done, then act as they would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            signal.raise_signal(got[0])


@contextlib.contextmanager
def _folder_lock(out: Path):
    """One process at a time renames outputs in out's folder (moving in, sweeping): otherwise a
    second writer of the same output could move its own in between our two renames. The lock is
    the folder's own (flock), so it leaves no file; closing the folder releases it."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock on a folder (NFS maps it to a write lock): go on
            pass  # unlocked, as before there was a lock; a lone writer needs none
        yield
    finally:
        os.close(fd)


def _move_in(tmp: Path, out: Path):
    """Steps 1-3 of the module docstring, SIGINT and SIGTERM deferred, under the folder's lock. An
    error before tmp is in place puts the old output back; the old one is deleted under a fresh
    temporary name, so a kill while deleting leaves a stale temporary, never a half-deleted folder
    that sweep would put back."""
    with _folder_lock(out), _signals_deferred():
        old = _temporary(out, OLD) if os.path.lexists(out) else None
        try:
            if old is not None:
                os.rename(out, old)
            os.rename(tmp, out)
        finally:
            if old is not None and os.path.lexists(old):
                if os.path.lexists(out):
                    trash = _temporary(out, PARTIAL)
                    os.rename(old, trash)
                    _remove(trash)
                else:
                    os.rename(old, out)


@contextlib.contextmanager
def _device_full(out: Path):
    """A full disk or quota while an output is written names the output (so a command ends in one
    line, model/cli.py); the partial output is removed by the caller, the old one stays."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"cannot write it: {os.strerror(e.errno)}", str(out)) from e
        raise


@contextlib.contextmanager
def atomic_dir(out, marker, force=False, reads=()):
    """with atomic_dir(out, "done.json", reads=(the inputs,)) as tmp: write every file into tmp,
    the marker last."""
    out = Path(out)
    check_target(out, marker, force, reads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(out, PARTIAL)
    tmp.mkdir()
    with _terminate_as_exit(), _device_full(out):
        try:
            yield tmp
            if not (tmp / marker).is_file():
                raise RuntimeError(f"{marker} was not written: {out} would be incomplete")
            _move_in(tmp, out)
        except BaseException:
            _remove(tmp)
            raise


@contextlib.contextmanager
def atomic_file(path):
    """with atomic_file(path) as tmp: write tmp; it then replaces the file (file_target(path)), so
    a reader sees the old file or the new one, never a part."""
    path = file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = _temporary(path, PARTIAL)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as to any new file
    with _terminate_as_exit(), _device_full(path):
        try:
            yield tmp
            if path.exists():
                shutil.copymode(path, tmp)  # a replaced file keeps its permissions
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise


def write_text_atomic(path, text):
    with atomic_file(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------- reading
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
    import torch  # its caller holds a model, so torch is loaded already
    return [] if (model.dtype, model.device.type) == (torch.float32, "cpu") else [str(model.dtype), model.device.type]


def read_folder(path, json_name, tensors_name, error, what, hint=""):
    """(the JSON, the tensors) of a folder that a command here wrote (an adapter, a trace); a
    missing or unreadable file raises error with one line that names the folder."""
    from safetensors.torch import load_file  # a process that only writes files never loads torch
    from model.jsonfile import read_json  # (nor the model package)

    path = Path(path)
    for name in (json_name, tensors_name):
        if not (path / name).is_file():
            raise error(f"no {what} in {path}: {name} is missing{hint}")
    try:
        meta = read_json(path / json_name, json_name, 64 << 20)
    except (ValueError, OSError) as e:
        raise error(f"{what} in {path}: {e}") from e
    try:
        return meta, load_file(str(path / tensors_name))
    except (SafetensorError, OSError) as e:
        raise error(f"{what} in {path} is truncated or corrupted: {e}") from e
