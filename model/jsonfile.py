"""The one way this project reads a JSON file a user can hand it (configs, tokenizers, adapters,
classifiers, task files, traces, settings; not the benchmark data read in place from
../shared/data): a regular file, its size checked before a byte is read, nested at most DEPTH
deep, no key twice in an object. A deeply nested file would otherwise end in
RecursionError (in the parser or in whatever walks it after), /dev/zero or a FIFO would be read
until memory runs out. Errors are ValueError naming the file (a command's bad input: model/cli.py)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

DEPTH = 64  # the configs, tokenizers, traces and classifiers here nest at most 6 deep
LIMIT = 256 << 20  # bytes, unless the caller says less: a tokenizer.json is a few MB


def unique_keys(pairs):
    """An object whose keys are all different: JSON allows a key twice, and json.loads would keep
    the last silently, so a file could say two things and be read as one."""
    d = dict(pairs)
    if len(d) < len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r:.40} appears twice in one object")
    return d


def parse_json(text, where, depth=DEPTH, **kw):
    """json.loads(text, **kw), refused when nested deeper than depth or holding a key twice."""
    try:
        obj = json.loads(text, object_pairs_hook=unique_keys, **kw)
    except RecursionError:
        raise ValueError(f"{where}: nests deeper than {depth}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    except ValueError as e:  # unique_keys
        raise ValueError(f"{where}: {e}") from None
    stack = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:  # iterative (a walk that recursed would itself hit the recursion limit), containers only
        v, d = stack.pop()
        if d > depth:
            raise ValueError(f"{where}: nests deeper than {depth}")
        stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, (dict, list)))
    return obj


def read_text(path, what="file", limit=LIMIT, encoding="utf-8"):
    """A regular file's text, at most limit bytes, its size checked before it is read."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a missing file: FileNotFoundError naming it; a FIFO: no wait
    with open(fd, "rb") as f:  # what was opened is what is looked at and read
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{what} {path} is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{what} {path} is {st.st_size:,} bytes; at most {limit:,}")
        data = f.read(limit + 1)  # a file that grows while read still stops here
    if len(data) > limit:
        raise ValueError(f"{what} {path} is over {limit:,} bytes")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path, what="file", limit=LIMIT, depth=DEPTH, **kw):
    """The JSON in a regular file of at most limit bytes, nested at most depth deep."""
    return parse_json(read_text(path, what, limit), f"{what} {path}", depth, **kw)
