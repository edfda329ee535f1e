"""How every command of this project ends on bad input: one line on stderr, "error: ...", and
exit status 2 (argparse's status for a bad argument), never a traceback.

    @command
    def main(argv=None): ...

Bad input is what this project raises for it and what a bad file or path raises: ValueError
and its subclasses (every LoadError, ConfigError, AdapterError, ... here; json's
JSONDecodeError; UnicodeDecodeError), an OSError that names a path or carries only a message
(a missing file, a folder that cannot be written, OutputExists), a corrupted safetensors file,
and a chat template that fails (jinja2's TemplateError, or any exception raised by the
template's own code: the template is input too). Standard output failing (a full device, a
closed pipe) is one line and status 2 as well (stdout_checked). Any other exception is a bug in
this code and keeps its traceback.

The argparse types below check numbers as the arguments are parsed, before any model loads;
writable_folder and writable_file check an output before the slow work, not after it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

from safetensors import SafetensorError


def bad_input(e: BaseException) -> bool:
    """Whether e is the input's fault (see the module docstring), not a bug here."""
    if isinstance(e, (ValueError, SafetensorError)):
        return True
    if isinstance(e, OSError):
        return e.filename is not None or e.errno is None
    jinja2 = sys.modules.get("jinja2")  # imported if a template was rendered
    if jinja2 is not None and isinstance(e, jinja2.TemplateError):
        return True
    return isinstance(e, Exception) and any(f.f_code.co_filename == "<template>"  # jinja2's compiled code
                                            for f, _ in traceback.walk_tb(e.__traceback__))


def message(e: BaseException) -> str:
    """One line: an OSError as "path: reason", any message's lines joined."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    if bad_input(e) and not isinstance(e, (ValueError, OSError, SafetensorError)):
        text = f"chat template: {type(e).__name__}: {text}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class _Watched:
    """sys.stdout, remembering the error a write or flush of it raised: that error, and only that
    one, is standard output failing (another OSError, say a full disk under a file, is not)."""

    def __init__(self, stream):
        self.stream, self.failed = stream, None

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            self.failed = e
            raise

    def flush(self):
        try:
            return self.stream.flush()
        except OSError as e:
            self.failed = e
            raise

    def __getattr__(self, name):
        return getattr(self.stream, name)


def output_failed(e: BaseException) -> bool:
    """Whether e is standard output failing (a full device, a closed pipe) under stdout_checked."""
    return e is not None and getattr(sys.stdout, "failed", None) is e


def stdout_checked(main):
    """main(argv=None), whose standard output failing (a full device, a closed pipe: while it
    prints, or at its last flush) ends in one line on stderr and status 2, not a traceback. Any
    other exception of main is left as it is (no flush after it, which could hide it)."""
    @functools.wraps(main)
    def run(argv=None):
        sys.stdout = watched = _Watched(sys.stdout)
        try:
            try:
                result = main(argv)
            except SystemExit:
                watched.flush()  # here, not at the interpreter's exit, where it cannot be handled
                raise
            watched.flush()
            return result
        except OSError as e:
            if e is not watched.failed:
                raise
            with contextlib.suppress(OSError, ValueError):  # the interpreter's last flush goes nowhere
                os.dup2(os.open(os.devnull, os.O_WRONLY), watched.stream.fileno())
            print(f"error: cannot write the output: {os.strerror(e.errno)}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            sys.stdout = watched.stream
    return run


def command(main):
    """main(argv=None), whose bad input ends in `error: ...` on stderr and exit status 2 (and a
    failing standard output too: stdout_checked)."""
    @stdout_checked
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except Exception as e:
            if not bad_input(e) or output_failed(e):
                raise
            print(f"error: {message(e)}", file=sys.stderr)
            raise SystemExit(2) from None
    return run


# ---------------------------------------------------------------- argparse types
def _number(kind, text):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def int_in(lo, hi=None):
    """An integer in [lo, hi] (hi None: no upper bound)."""
    def parse(text):
        v = _number(int, text)
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is not in {lo}..{hi}" if hi is not None else f"{v} is not >= {lo}")
        return v
    return parse


def float_in(lo, hi=math.inf, lo_open=False):
    """A finite number in [lo, hi] ((lo, hi] with lo_open)."""
    def parse(text):
        v = _number(float, text)
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
            where = ("(" if lo_open else "[") + f"{lo:g}, " + (f"{hi:g}]" if math.isfinite(hi) else "inf)")
            raise argparse.ArgumentTypeError(f"{text} is not a finite number in {where}")
        return v
    return parse


positive = int_in(1)
non_negative = int_in(0)
seed_number = int_in(0, 2 ** 64 - 1)  # what torch's generators take
# more threads than CPUs only slows a run down, and far more crash torch's thread pool
threads = int_in(1, os.cpu_count() or 1)


# ---------------------------------------------------------------- outputs, checked before the work
def _folder(path, what):
    """Create the folder and write a file in it, or raise ValueError("{what} ...")."""
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{what} is a symbolic link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ValueError(f"{what} cannot be written ({e.strerror or e})") from None


def r_and_top_k_within(ap, a):
    """--r and --top-k within the model's layers and vocabulary, from its config before it loads."""
    from .config import load_config
    cfg = load_config(a.model)
    if a.r > cfg.n_layers or a.top_k > cfg.vocab_size:
        ap.error(f"need --r <= {cfg.n_layers} (the layers) and --top-k <= {cfg.vocab_size} (the vocabulary)")


def writable_folder(path, option="--out") -> Path:
    """Create the output folder now and check that a file can be written in it."""
    path = Path(path)
    _folder(path, f"{option} {path}")
    return path


def writable_file(path, option="--out", kind=None) -> Path:
    """Check now that the output file can be written: a regular file or a new name, in a folder
    that can be written (created if missing). kind: (what, its first bytes): an existing file
    must be one, so a command never replaces a file of another kind (a trace, a config, a text)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{option} {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_file():
        raise ValueError(f"{option} {path} exists and is not a regular file")
    if kind is not None and path.exists():
        what, magic = kind
        with open(path, "rb") as f:
            if f.read(len(magic)) != magic:
                raise ValueError(f"{option} {path} exists and is not a {what}: this command replaces only a {what}")
    _folder(path.parent, f"{option} {path}: its folder {path.parent}")
    return path
