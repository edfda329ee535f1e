"""The three methods, their baselines and our extensions, one file each at this level; built on
them, each in its own package: the trace format and its tools (trace/), training (train/), and
the benchmarks, evaluations and demo (harness/). Imports go one way: harness -> trace, train ->
the methods -> model (tests/test_layout.py)."""
from weights import DEFAULT_MODEL, WEIGHTS

ROOT = WEIGHTS.parent
DATA = ROOT.parent / "shared" / "data"  # benchmark and training data, read in place (never copied)
RUNS = ROOT / "runs"  # git-ignored outputs: caches, benchmark JSON, plots

__all__ = ["DATA", "DEFAULT_MODEL", "ROOT", "RUNS", "WEIGHTS"]
