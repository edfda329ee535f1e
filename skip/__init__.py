"""The three methods (and their baselines, training and the trace format); the benchmarks,
evaluations and demo that use them are in skip/harness/, which no method imports."""
from weights import DEFAULT_MODEL, WEIGHTS

ROOT = WEIGHTS.parent
DATA = ROOT.parent / "shared" / "data"  # benchmark and training data, read in place (never copied)
RUNS = ROOT / "runs"  # git-ignored outputs: caches, benchmark JSON, plots

__all__ = ["DATA", "DEFAULT_MODEL", "ROOT", "RUNS", "WEIGHTS"]
