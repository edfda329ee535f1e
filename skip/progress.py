"""A one-line progress bar on stderr (no dependency)."""
import sys
import time


class Progress:
    def __init__(self, total, desc="", every=1.0):
        self.total, self.desc, self.every = total, desc, every
        self.n, self.t0, self.last = 0, time.perf_counter(), 0.0

    def update(self, n=1, **info):
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            frac = min(1.0, self.n / max(1, self.total))
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            sys.stderr.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {now - self.t0:.0f}s {extra}   ")
            if self.n >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def close(self):
        if self.n < self.total:
            sys.stderr.write("\n")
