"""Batched traces (ours): one batched run of a method written as one trace per row, and compared
row by row, so that a port's batched output is checked against ours a row at a time.

A batch folder holds row-0/, row-1/, ..., each a trace (skip/trace/format.py) of that row, and
batch.json, written last (weights/files.py's marker): {"version", "rows" (the batch size), "method",
"settings"}. A row's trace records what the batched run did for that row: its prompt, its tokens
and its steps (Kangaroo's rounds from the row= callbacks, cache lengths counting the row's own
slots, not the padding and holes the rows share; AdaInfer's exit layers and checks; the kept
layers or schedule), and the prompt-pass tensors of its prompt run alone. Kangaroo's rows also
record their "layer_runs" as each row alone would run them: every layer run on the row's real
slots, at its own positions (padding, holes and filler left out: generate_kangaroo_batch's
on_layer), so a batched row's first wrong layer is named as an unbatched run's. What is the
batch's, not the row's, is left out (both fields are optional in the format): "flops" (the work of
all rows together, padding included) and the other methods' "layer_runs" (slots shared by the
rows). So a row compares equal (status 0) to the unbatched trace of its prompt.

compare on two batch folders compares row i with row i (skip/trace/compare.py); each finding
names its row, the first divergence (of the lowest row) first. A batch against a single trace,
batches of different sizes, a batch.json that is not one, or a row missing or extra: TraceError
(status 2, one line).

A queue (trace_batch's batch_size; model/queue.py) writes the same folder: each row's trace is its
prompt's, whichever rows it shared the batch with, so it too compares equal to the prompt's
unbatched trace.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.config import is_int
from model.jsonfile import read_json
from weights.files import atomic_dir

from .check import read
from .compare import compare, tolerances
from .format import DEFAULTS, VERSION, TraceError, prompt_pass, settings_used, write
from .methods import METHODS, QUEUED, kangaroo_steps

BATCH_FILE = "batch.json"
BATCH_FIELDS = ("version", "rows", "method", "settings")
ROW = "row-{}"


def write_batch(path, method, settings, rows, force=False):
    """A batch folder from any writer, ours or a port's: rows, one function per row, each writing
    that row's trace into the folder it is given (format.write, port.write_transformers_trace);
    batch.json is written last, the folder moved in whole (weights/files.py)."""
    if not rows:
        raise TraceError("a batch needs at least one row")
    with atomic_dir(path, BATCH_FILE, force) as tmp:
        for i, row in enumerate(rows):
            row(tmp / ROW.format(i))
            written, _ = read(tmp / ROW.format(i), False)  # a row function that wrote no trace fails here, not later
            if written["method"] != method:
                raise TraceError(f"row {i} is a {written['method']} trace, the batch's method is {method}")
        meta = {"version": VERSION, "rows": len(rows), "method": method, "settings": settings}
        (tmp / BATCH_FILE).write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n")


def trace_batch(model, prompts, path, method="full", max_new_tokens=16, settings=None, force=False, batch_size=None):
    """Write the traces of our decoder running method on the prompts (lists of ids) as one batch,
    or batch_size rows at a time from a queue (the methods of QUEUED; model/queue.py)."""
    if not prompts:
        raise TraceError("a batch needs at least one prompt")
    if batch_size is not None and method not in QUEUED:
        raise TraceError(f"a queue (batch_size) is for {', '.join(QUEUED)}; {method} decodes its prompts as one batch")
    settings = settings_used(method, settings or {})
    prompts, runs = [list(p) for p in prompts], [[] for _ in prompts]  # runs: each row's layer runs (Kangaroo's)
    queue = {} if batch_size is None else {"batch_size": batch_size}
    rows = (kangaroo_steps(model, prompts, max_new_tokens, settings, batch_size, runs) if method == "kangaroo" else
            METHODS[method](model, prompts, max_new_tokens, settings, **queue))  # one batched run
    dtype = str(model.dtype).removeprefix("torch.")
    write_batch(path, method, settings, [
        lambda folder, ids=ids, tokens=tokens, steps=steps, own=own: write(
            folder, model.cfg, ids, tokens, prompt_pass(model, ids), method, settings, steps, None, dtype, own or None)
        for ids, (tokens, steps), own in zip(prompts, rows, runs)], force)


def is_batch(path):
    return (Path(path) / BATCH_FILE).is_file()


def read_batch(path):
    """(batch.json, the row folders in order) of a batch folder, batch.json and every row checked:
    each a trace (skip/trace/check.py) of the batch's method, settings, model and dtype."""
    path = Path(path)

    def bad(why):
        raise TraceError(f"{path} is not a valid batch of traces: {why}")
    try:
        meta = read_json(path / BATCH_FILE, BATCH_FILE, 1 << 20)
    except (OSError, ValueError) as e:
        bad(f"{BATCH_FILE} is unreadable or not JSON: {e}")
    if not isinstance(meta, dict) or set(meta) != set(BATCH_FIELDS):
        bad(f"{BATCH_FILE} must be an object of exactly the fields {list(BATCH_FIELDS)}")
    if meta["version"] != VERSION:
        raise TraceError(f"batch in {path} has version {meta['version']!r:.40}; this reader understands {VERSION}")
    n = meta["rows"]
    if not (is_int(n) and n >= 1):
        bad(f"rows must be an integer >= 1, got {n!r:.40}")
    if meta["method"] not in DEFAULTS or not isinstance(meta["settings"], dict):
        bad(f"method must be one of {', '.join(DEFAULTS)} and settings an object")
    names = {p.name for p in path.iterdir() if p.name.startswith("row-")}
    want = {ROW.format(i) for i in range(n)}
    if names != want:
        bad(f"it holds {n} rows by {BATCH_FILE}; missing {sorted(want - names)}, not of it {sorted(names - want)}")
    rows = [path / ROW.format(i) for i in range(n)]
    first = None
    for i, row in enumerate(rows):
        m, _ = read(row, False)
        run = (m["method"], m["settings"], m["model"], m.get("dtype", "float32"))
        if m["method"] != meta["method"] or m["settings"] != meta["settings"] or (first or run)[2:] != run[2:]:
            bad(f"row {i} is not of the batch's run (its method, settings, model or dtype differ)")
        first = first or run
    return meta, rows


def compare_any(ref, other, atol=None, rtol=None, every=False, expect=(), convention=None, eos=None):
    """compare (skip/trace/compare.py) of two traces, or of two batch folders row by row: (notes,
    findings); a finding of a batch starts with its row ("row 2: step 3 of kangaroo differs ...")."""
    kinds = is_batch(ref), is_batch(other)
    if kinds == (False, False):
        notes = [tolerances(read(ref)[0], read(other)[0], atol, rtol)[2]]
        return notes, compare(ref, other, atol, rtol, notes, every, expect, convention, eos)
    if kinds != (True, True):
        batch, single = (ref, other) if kinds[0] else (other, ref)
        raise TraceError(f"{batch} is a batch of traces and {single} is not: compare a row of it "
                         f"({Path(batch) / ROW.format('i')}) with a single trace")
    (_, ra), (_, oa) = read_batch(ref), read_batch(other)
    if len(ra) != len(oa):
        raise TraceError(f"the batches hold {len(ra)} and {len(oa)} rows: a row by row compare needs the same prompts")
    found, notes, where = [], [tolerances(read(ra[0])[0], read(oa[0])[0], atol, rtol)[2]], {}
    for i, (a, b) in enumerate(zip(ra, oa)):
        row_notes = []
        found += [f"row {i}: {w}" for w in compare(a, b, atol, rtol, row_notes, every, expect, convention, eos)]
        for note in row_notes:
            where.setdefault(note, []).append(i)
    notes += [f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}: {note}" for note, rows in where.items()]
    return notes, found
