"""The harness's one way to run a benchmark. A benchmark names its contenders (each a way to
decode a batch of prompts: a method, its baseline, a peer), and compare() runs them on the same
batches, taking turns within every run so that a drift of the machine's speed hits all of them
alike; the benchmark then reads what it measures from the outputs, records and medians, and
publishes rows through report.publish. parser() and start() are the command line every
benchmark shares (its model, threads, output folder, device and dtype).

    got = compare([Contender("plain", plain, model), Contender("early exit", exit_, model)],
                  batches=[prompts[:4]], rounds=3)
    got["early exit"].tokens_per_s(fed) / got["plain"].tokens_per_s(fed)  # the speedup
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from model import add_load_args, load_model
from model.cli import threads as thread_count, writable_folder
from tokenizer import load_tokenizer

from .. import DEFAULT_MODEL, RUNS
from .timing import interleaved_ms


@dataclass
class Contender:
    """One way to decode: run(prompts) decodes a batch (a list of token-id lists) and returns
    what the benchmark reads (token lists, or outputs with their rounds and exits). model: our
    decoder it runs on, whose decode clock and record compare() reads; None for a peer (transformers),
    which is timed whole and records nothing."""
    name: str
    run: Callable
    model: object = None


@dataclass
class Runs:
    """One contender on every batch: the last output, the median milliseconds and the last
    record (model.recording(); None unless asked), each a list over the batches."""
    outputs: list = field(default_factory=list)
    ms: list = field(default_factory=list)
    records: list = field(default_factory=list)

    def tokens_per_s(self, tokens):
        """tokens (what the benchmark counts over all batches) per second of the summed medians."""
        return 1000 * tokens / sum(self.ms)


def compare(contenders, batches, rounds, *, decode_only=True, record=False, warmup=0, desc=None):
    """Every contender on every batch, the contenders taking turns within each of `rounds` rounds
    (after `warmup` untimed ones; the medians are over the timed ones). decode_only: time each call's decode alone (timing.DecodeClock on
    the contender's model: the prompt pass, the same full pass for every method, is outside), else
    the whole call. record: run every call inside its model's recording() (a record entry per
    layer, paid by every contender alike) and keep the last one, for FLOPs and layer counts.
    Returns {name: Runs}, in the contenders' order; desc: a progress bar over the batches."""
    if decode_only and any(c.model is None for c in contenders):
        raise ValueError("a contender without our model can only be timed whole (decode_only=False)")
    if len({c.name for c in contenders}) < len(contenders):
        raise ValueError(f"contenders need distinct names, got {[c.name for c in contenders]}")
    out = {c.name: Runs() for c in contenders}
    for batch in tqdm(batches, desc=desc, disable=desc is None):
        last = {}

        def call(c, batch=batch):
            def go():
                with (c.model.recording() if record and c.model is not None else nullcontext()) as rec:
                    last[c.name] = (c.run(batch), rec)
            return go
        ms = interleaved_ms([call(c) for c in contenders], rounds, warmup=warmup,
                            models=[c.model for c in contenders] if decode_only else None)
        for c, t in zip(contenders, ms):
            got = out[c.name]
            got.outputs.append(last[c.name][0])
            got.ms.append(t)
            got.records.append(last[c.name][1])
    return out


def tokens_of(output):
    """The token ids of one row's output: a list of ids, or an output with .tokens."""
    return output if isinstance(output, list) else output.tokens


# ---------------------------------------------------------------- the shared command line
def parser(doc, threads=2):
    """A benchmark's command line: its docstring as help, --model, --out, the device and dtype
    options, and --threads (default `threads`; None: none). The benchmark adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    if threads is not None:
        ap.add_argument("--threads", type=thread_count, default=threads)
    ap.add_argument("--out", type=Path, default=RUNS)
    add_load_args(ap)
    return ap


def start(a, tokenizer=True):
    """After the benchmark's own checks: --out writable, --threads set, the model (and its
    tokenizer) loaded. Returns the model, or (model, tokenizer)."""
    writable_folder(a.out)
    if getattr(a, "threads", None) is not None:
        torch.set_num_threads(a.threads)
    model = load_model(a.model, a.dtype, device=a.device)
    return (model, load_tokenizer(a.model)) if tokenizer else model


def settings(a):
    """The command line's values, for a result's record (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
