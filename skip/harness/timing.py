"""The harness's one timer: medians of interleaved runs on torch.utils.benchmark's clock (which
first waits for queued accelerator work), so that drift on a shared machine hits every
contender alike. Interleaved calls, not benchmark.Timer: its timeit() runs the statement twice
more as a warm-up and at one thread by default, which a stateful step (a decode step that
writes the cache) and a 2-core machine cannot afford.

A decode is timed by DecodeClock, through the model's observing hook, so no benchmark times a
prompt pass alone to subtract it."""
from __future__ import annotations

import statistics

from torch.utils.benchmark.utils.timer import timer as clock

from model.flops import EmbedRun


def timed(fn):
    """fn() and the milliseconds it took: (output, ms)."""
    t0 = clock()
    out = fn()
    return out, 1000 * (clock() - t0)


def timed_decode(model, fn):
    """fn() and the milliseconds of its decode alone (DecodeClock on model): (output, ms)."""
    with DecodeClock(model) as t:
        out = fn()
    return out, t.ms


def interleaved_ms(fns, runs, setup=None, warmup=1, models=None):
    """Median milliseconds of each zero-argument fn over `runs` rounds in which the fns take
    turns (after `warmup` untimed rounds); setup(i), if given, runs untimed before fn i.
    models: time only the decode of fn i, on models[i] (timed_decode), not the whole call."""
    times = [[] for _ in fns]
    for r in range(warmup + runs):
        for i, fn in enumerate(fns):
            if setup is not None:
                setup(i)
            _, ms = timed(fn) if models is None else timed_decode(models[i], fn)
            if r >= warmup:
                times[i].append(ms)
    return [statistics.median(t) for t in times]


def median_ms(fn, runs=15, setup=None):
    """Median milliseconds of fn alone (after one untimed call)."""
    return interleaved_ms([fn], runs, None if setup is None else lambda i: setup())[0]


class DecodeClock:
    """Times the decode of one generation call directly, whatever the method: from the second
    embedding lookup the model reports (the first token fed back; the first is the prompt's)
    to the end of the call, so the prompt pass and the choice of the first token are outside.

        with DecodeClock(model) as t:
            tokens = method(model, prompt)
        t.ms  # decode milliseconds (0.0 when nothing was fed back)
    """

    def __init__(self, model):
        self.model, self.embeds, self.start, self.ms = model, 0, None, 0.0

    def _see(self, run, h):
        if isinstance(run, EmbedRun):
            self.embeds += 1
            if self.embeds == 2:
                self.start = clock()

    def __enter__(self):
        self._ctx = self.model.observing(self._see)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        end = clock()
        self._ctx.__exit__(*exc)
        self.ms = 0.0 if self.start is None else 1000 * (end - self.start)
        return False
