"""The harness's one way to record a benchmark (publish: its JSON with the run that made it,
command, date and machine, and its tables), its one table writer (rows to a GitHub markdown
table, laid out by tabulate) and its one quality measure of generated tokens (token_match).

A float cell is formatted by its column's floatfmt (one format, or one per column), also in a
column that holds text too (where tabulate would print it unformatted); any other cell is
printed as it is (None: empty), a string never parsed back into a number. The rows keep their
cells' own width and the rule under the header is `|---|` (`|---:|` for the columns in
`right`), so a table reads the same in the raw file as the results docs quote it.
"""
from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from model.products import cpu_field


def cpu_name():
    """The CPU as the kernel names it (benchmarks differ between Intel and AMD machines)."""
    return cpu_field("model name") or platform.processor() or platform.machine()


def run_record():
    """What made a result: the command, the date, the machine (CPU, threads, torch)."""
    import torch
    module = sys.modules["__main__"].__spec__
    command = (f"python -m {module.name}" if module else sys.argv[0]) + "".join(f" {a}" for a in sys.argv[1:])
    return {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}


RESULT = ("result file of this project's", b'{\n "run": ')  # what record() writes begins so: writable_file's kind


def record(result):
    """The JSON text of a result, its run first (RESULT)."""
    return json.dumps({"run": run_record(), **result}, indent=1, allow_nan=False) + "\n"


def publish(out, name, result, md):
    """Write out/<name>.json (result, with "run": run_record()) and out/<name>.md (md), each
    replacing the old one whole (weights/files.py), and print md."""
    from weights.files import write_text_atomic
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{name}.json", record(result))
    write_text_atomic(out / f"{name}.md", md.rstrip("\n") + "\n")
    print(md)


def markdown_table(rows, headers, floatfmt="g", right=()):
    """rows: lists of cells; right: indices of the columns to right-align when rendered."""
    from tabulate import DataRow, TableFormat, tabulate  # the bench extra: a CLI's --help runs without it

    fmts = [floatfmt] * len(headers) if isinstance(floatfmt, str) else floatfmt
    cells = [[format(c, f) if isinstance(c, float) else c for c, f in zip(r, fmts)] for r in rows]
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"
    row = DataRow("|", "|", "|")
    fmt = TableFormat(lineabove=None, linebelowheader=lambda *_: rule, linebetweenrows=None, linebelow=None,
                      headerrow=row, datarow=row, padding=1, with_header_hide=None)
    return tabulate(cells, headers, tablefmt=fmt, stralign=None, numalign=None, disable_numparse=True)


def token_match(tokens, ref):
    """The share of ref's positions at which tokens holds the same id (position by position)."""
    return sum(x == y for x, y in zip(tokens, ref)) / len(ref)
