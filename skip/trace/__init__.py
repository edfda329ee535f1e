"""Traces, the oracle format, and their tools; imports go one way, down this list:
    format.py    what a trace holds, and write() (any implementation can write one)
    check.py     read(): every field and tensor checked, so nothing else reads garbage
    compare.py   where two traces part, in words
    methods.py   what each of our methods records, and trace(): one run -> one trace
    batch.py     a batched run -> one trace per row; two batches compared row by row
    show.py      a trace as a picture
    port.py      a trace from a port built on transformers
    __main__.py  python -m skip.trace write|compare|show
"""
