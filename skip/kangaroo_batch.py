"""The rows of a batched Kangaroo decoding (ours; the method is skip/kangaroo.py): which prompts are
still in the batch, each one's tokens and rounds, the slot n where every row's next token x goes,
and what each round's verification wasted on the row.

Rows share the caches' slots (model/cache.py): a round from slot n ends at n + max a_i + 1, the
longest accepted row, and a row that accepted fewer keeps holes there. A row that meets EOS or
its token budget leaves the batch's work; `active` maps each batch row to its prompt.
"""
from __future__ import annotations


class Rows:
    def __init__(self, prompts, max_new_tokens, eos):
        self.prompts, self.max_new_tokens, self.eos = prompts, max_new_tokens, eos
        self.T = max(map(len, prompts))  # the padded prompt length
        self.n = self.T  # the slot of every row's x, the newest committed token (not cached yet)
        self.active = list(range(len(prompts)))  # the prompt of each batch row
        self.tokens, self.rounds = [[] for _ in prompts], [[] for _ in prompts]

    def padding(self):
        """Which slots of the left-padded prompts (B, T) hold real tokens."""
        return [[False] * (self.T - len(p)) + [True] * len(p) for p in self.prompts]

    def last(self):
        """Each batch row's x."""
        return [self.tokens[r][-1] for r in self.active]

    def budgets(self, gamma):
        """Each batch row's k: gamma, but never drafting past its max_new_tokens."""
        return [min(gamma, self.max_new_tokens - len(self.tokens[r]) - 1) for r in self.active]

    def commit(self, rounds, new):
        """Each batch row's Round and the tokens it commits, up to its EOS or budget; the round's
        holes are the row's slots before n that are not its tokens (padding and earlier holes)."""
        for r, rnd, tokens in zip(self.active, rounds, new):
            rnd.holes = self.n - len(self.prompts[r]) - len(self.tokens[r]) + 1
            self.rounds[r].append(rnd)
            for t in tokens:
                self.tokens[r].append(t)
                if self.done(r):
                    break
        self.n += max(rnd.accepted for rnd in rounds) + 1

    def done(self, r):
        return self.tokens[r][-1] in self.eos or len(self.tokens[r]) == self.max_new_tokens

    def leave(self):
        """Drop the finished rows: the batch rows that stay, or None when all do."""
        keep = [i for i, r in enumerate(self.active) if not self.done(r)]
        if len(keep) == len(self.active):
            return None
        self.active[:] = [self.active[i] for i in keep]  # in place: observers hold this list
        return keep
