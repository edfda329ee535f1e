"""The harness's one table writer (rows to a GitHub markdown table, laid out by tabulate) and
its one quality measure of generated tokens (token_match).

A float cell is formatted by its column's floatfmt (one format, or one per column), also in a
column that holds text too (where tabulate would print it unformatted); any other cell is
printed as it is (None: empty), a string never parsed back into a number. The rows keep their
cells' own width and the rule under the header is `|---|` (`|---:|` for the columns in
`right`), so a table reads the same in the raw file as the results docs quote it.
"""
from __future__ import annotations


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
