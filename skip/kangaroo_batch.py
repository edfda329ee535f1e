"""Batched Kangaroo (ours; the method, for one sequence, is skip/kangaroo.py): prompts of
different lengths decoded as one batch, each row exactly as skip/kangaroo.py decodes it alone
(greedy: the same tokens, drafts and accepted counts; sampled: in distribution, the rows sharing
one generator). tests/test_kangaroo_batch.py binds every row to its run alone.

The same four steps as the paper file, per row:
  1. draft: each row drafts to its own k or eta (under the default policy, below); a row that has
     stopped waits while the others draft, its slots filler, never accepted;
  2. verify: one pass of layers [l, L) for all rows, over the batch's longest draft;
  3. accept: each row by its own drafts and M's logits;
  4. crop: each row keeps x and its accepted drafts; the caches end at the longest row, and the
     rest of each row's slots become holes (KVCache.hide).
Rows share each cache's slots (model/cache.py): left padding, holes and filler are slots whose
`valid` is False, and a row's RoPE position counts only its real slots, so a row sees exactly
the keys and positions it would see alone. A's cache keeps its own mask: A catches a row up a
round late (as skip/kangaroo.py explains) in a slot of A's own, so A's slots may run ahead of
M's by one a round while each state keeps the row's own position. A row that meets EOS or its
token budget leaves the batch (KVCache.reorder).

A queue (batch_size below the number of prompts; continuous batching, as servers decode): the
first batch_size prompts start as one batch, and when a row ends the next waiting prompt takes
its row at the round boundary: it is prefilled alone, exactly as its run alone starts, and
seated in that row of M's and A's caches (KVCache.seat), its x at slot n as every row's. Every
row still equals its run alone, whatever joins or leaves around it.

How many tokens a row drafts is a policy (step 1); every policy is exact (greedy: plain greedy's
tokens; sampled: the target distribution), since verification alone decides what is kept:
  "row"         the paper's, per row: each row to its own k (gamma, fewer near its budget) or eta;
  "batch_k"     every row drafts the same k, the smallest of the rows' (no eta: eta must be 0),
                as batched peers with a fixed draft length do;
  "batch_stop"  each row to its own k, but drafting stops for every row after a draft below eta
                in any row (a row's last draft before its own k included).
Only "row" leaves each row equal to its run alone; under the others a row's rounds depend on its
mates. With one row all three are the paper file's run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from model import boundary, check_batch_size, check_eos, first_rows, left_pad, positions

from .kangaroo import (KangarooOutput, Round, Sampling, accept_greedy, accept_sampled, adapt, check_settings, probs,
                       self_draft)


@dataclass
class RowRound(Round):
    """A row's Round, and what its share of the batch's verification wasted (0 for one row)."""
    idle: int = 0  # verified positions after the row stopped drafting (the batch's longest k minus its k)
    holes: int = 0  # the row's padding and holes among the slots before n (keys its attention skips)


class Rows:
    """Which prompts are in the batch (`active`: the prompt of each batch row) and which wait
    (`queue`), each one's tokens and rounds, and the slot n where every row's next token x goes."""

    def __init__(self, prompts, max_new_tokens, eos, batch_size):
        self.prompts, self.max_new_tokens, self.eos = prompts, max_new_tokens, eos
        self.active, self.queue = first_rows(len(prompts), batch_size)
        self.T = max(len(prompts[r]) for r in self.active)  # the padded prompt length
        self.n = self.T  # the slot of every row's x, the newest committed token (not cached yet)
        self.tokens, self.rounds = [[] for _ in prompts], [[] for _ in prompts]

    def alone(self, r):
        """Prompt r as a batch of its own (a join's prefill), its tokens and rounds this queue's."""
        solo = copy.copy(self)  # shares prompts, tokens and rounds
        solo.active, solo.queue, solo.T = [r], [], len(self.prompts[r])
        solo.n = solo.T
        return solo

    def padding(self):
        """Which slots of the active rows' left-padded prompts (B, T) hold real tokens."""
        return [[False] * (self.T - len(self.prompts[r])) + [True] * len(self.prompts[r]) for r in self.active]

    def last(self):
        return [self.tokens[r][-1] for r in self.active]  # each batch row's x

    def budgets(self, gamma):
        """Each batch row's k: gamma, but never drafting past its max_new_tokens."""
        return [min(gamma, self.max_new_tokens - len(self.tokens[r]) - 1) for r in self.active]

    def commit(self, rounds, new):
        """Each batch row's RowRound and the tokens it commits, up to its EOS or budget; the round's
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


class Batch:
    """The paper's draft model kg (its A, H, exit_logits and pick; skip/kangaroo.py) over the rows
    of `rows`, with caches of B rows whose `valid` masks say which slots hold a row's states."""

    def __init__(self, kg, rows, max_len, observe=None, on_layer=None):
        B = len(rows.active)
        self.kg, self.model, self.l, self.rows, self.observe = kg, kg.model, kg.l, rows, observe
        self.on_layer = on_layer
        self.cache = self.model.new_cache(B, max_len)
        # A's catch-ups take slots of their own when some rows catch up and others do not: at most one
        # a round, at most max_new_tokens rounds; one row catches up in its own next slot, as alone
        self.acache = None if kg.A is None else kg.A.new_cache(B, max_len + (rows.max_new_tokens if B > 1 else 0))
        self.pending = None  # (B, 1, d) each row's last draft's h_l (the paper file's `pending`, per row)
        self.lagging = [False] * B  # the rows whose pending state A has not read (they accepted every draft)

    def shallow(self, ids, start, real):
        """M^s on ids (B, T) at slots [start, start + T), real (B, T) bools (False: padding or a
        stopped row's filler): the exited states h_l (B, T, d)."""
        mask = self.cache.open(ids.shape[1], real)  # None while every slot is real
        pos = positions(mask, start, ids.shape[1], ids.device)  # (B|1, T)
        return self.model.run_layers(self.model.embed_tokens(ids, pos), pos, range(self.l), self.cache, start, mask,
                                     self.rows_seen(pos, mask, start))

    def deep(self, h_l, start):
        """Layers [l, L) on exited states h_l (B, T, d) at slots [start, start + T), opened by shallow."""
        mask = self.cache.pad_mask(start + h_l.shape[1])
        pos = positions(mask, start, h_l.shape[1], h_l.device)  # (B|1, T)
        return self.model.run_layers(h_l, pos, range(self.l, self.model.cfg.n_layers), self.cache, start, mask,
                                     self.rows_seen(pos, mask, start))

    def rows_seen(self, pos, mask, start):
        """run_layers' callback for on_layer: each layer's output on each row's real slots, told as
        that row alone would run them (at its own position, without padding, holes or filler)."""
        if self.on_layer is None:
            return None
        T = pos.shape[1]
        real = torch.ones(len(self.rows.active), T, dtype=torch.bool) if mask is None else mask[:, start:].cpu()

        def seen(i, h, a, m):
            for b, r in enumerate(self.rows.active):
                # a row's real slots in one run are consecutive positions: its padding comes first, and a
                # row that stops drafting does not start again in that round
                if real[b].any():
                    own = pos[min(b, len(pos) - 1)]  # pos is (1, T) while no row has padding or holes
                    self.on_layer(i, int(own[real[b]][0]), h[b:b + 1, real[b].to(h.device)], row=r)
        return seen

    def prefill(self, h_l, real):
        if self.acache is not None:  # A reads the prompts' exited states (B, T, d)
            adapt(self.model, self.kg.A, h_l, self.acache, 0, self.acache.open(h_l.shape[1], real))

    def draft_logits(self, h_l, drafting):
        """M^d's logits (B, V') of each row's next token, from the exited state h_l (B, 1, d) of its
        newest slot; drafting (B,) bools: the rows that draft now (the others' are filler)."""
        z = self.exit_logits(h_l, drafting)
        if self.observe is not None:
            for b in (b for b, d in enumerate(drafting) if d):
                self.observe("draft", h_l[b:b + 1], z[b], getattr(self.kg, "vocab", None), row=self.rows.active[b])
        return z

    def exit_logits(self, h_l, drafting):
        if self.acache is None:
            return self.kg.exit_logits(h_l, None, 0)
        real = [[d] for d in drafting]
        if any(lag and d for lag, d in zip(self.lagging, drafting)):  # A catches rows up, in a slot of its own
            real = [[lag and d, d] for lag, d in zip(self.lagging, drafting)]
            h_l = torch.cat([self.pending, h_l], 1)  # (B, 2, d)
            self.lagging = [lag and not d for lag, d in zip(self.lagging, drafting)]
        start = self.acache.lengths[0]
        return self.kg.exit_logits(h_l, self.acache, start, self.acache.open(h_l.shape[1], real))

    def verify(self, h_l, n, drafted):
        """M's logits (B, K + 1, V) at slots [n, n + K], from the exited states h_l (B, K + 1, d);
        row b's after its own drafted[b] + 1 are filler."""
        logits = self.model.logits(self.deep(h_l, n))
        if self.observe is not None:
            for b, k in enumerate(drafted):
                self.observe("verify", h_l[b:b + 1, :k + 1], logits[b, :k + 1], None, row=self.rows.active[b])
        return logits

    def crop(self, n, accepted, drafted, h_l):
        """Row b keeps its first accepted[b] + 1 slots from n in every cache (x and the accepted
        drafts). h_l (B, K + 1, d): the round's exited states."""
        kept = [a + 1 for a in accepted]
        keep(self.cache, n, kept)
        if self.acache is not None:
            # A read x and the drafts but the last in the round's last max(drafted) slots: from x's slot
            keep(self.acache, self.acache.lengths[0] - max(drafted), kept)
            self.pending = h_l[torch.arange(len(kept), device=h_l.device), drafted][:, None]  # (B, 1, d) at n + k_b
            self.lagging = [a == k for a, k in zip(accepted, drafted)]

    def seat(self, b, solo):
        """Batch row b takes the caches of solo, a one-row Batch that prefilled a prompt alone
        (KVCache.seat); n moves if the prompt needed more slots than the batch had."""
        self.cache.seat(b, solo.cache)
        self.rows.n = self.cache.lengths[0]
        if self.acache is not None:
            self.acache.seat(b, solo.acache)
            self.lagging[b] = False  # A has read the whole prompt, as after a prefill

    def trim(self):
        """Drop the slots that are padding in every row (KVCache.trim); n moves left with them."""
        self.rows.n -= self.cache.trim()
        if self.acache is not None:
            self.acache.trim()

    def keep_rows(self, rows):
        """Drop the finished rows: row i becomes the old row rows[i]."""
        for cache in (self.cache, self.acache) if self.acache is not None else (self.cache,):
            cache.reorder(rows)
        self.pending = None if self.pending is None else self.pending[rows]  # None: before the first round
        self.lagging = [self.lagging[r] for r in rows]


def keep(cache, start, kept):
    """Row b keeps its first kept[b] slots from start: the cache ends at the longest row, and the
    rest of each row become holes (model/cache.py)."""
    cache.crop(start + max(kept))
    cache.hide(start, kept)


def draft_rows(bt: Batch, xs, n, ks, eta, s: Sampling, policy="row"):
    """Step 1 for every row (skip/kangaroo.py's draft, per row): each row's d_1..d_k and their q,
    and the exited states h_l (B, K + 1, d), K the most any row drafted."""
    drafts, qs, hs = [[] for _ in xs], [[] for _ in xs], []
    # going: the rows whose token at n + i is real, then those that draft from it
    going, conf, toks = [True] * len(xs), [1.0] * len(xs), list(xs)
    for i in range(max(ks) + 1):
        ids = torch.tensor(toks, device=bt.model.device)[:, None]  # (B, 1): a stopped row's is filler
        hs.append(bt.shallow(ids, n + i, [[g] for g in going]))  # (B, 1, d)
        if policy == "batch_stop":  # a draft below eta in any row ends every row's drafting
            confident = [all(c >= eta for g, c in zip(going, conf) if g)] * len(xs)
        else:
            confident = [c >= eta for c in conf]
        going = [g and i < k and c for g, k, c in zip(going, ks, confident)]  # the rows that draft at n + i
        if not any(going):
            break
        z = bt.draft_logits(hs[-1], going)  # (B, V')
        for b in (b for b, g in enumerate(going) if g):
            toks[b], conf[b], q = bt.kg.pick(z[b], s)
            drafts[b].append(toks[b])
            qs[b].append(q)
    return drafts, qs, torch.cat(hs, 1)


def round_rows(bt: Batch, xs, n, ks, eta, s: Sampling, policy="row"):
    """One round from each row's x at slot n, row b drafting at most ks[b] (batch_k: every row the
    smallest): draft, verify, accept, crop. Returns each row's RowRound and the a + 1 tokens it
    commits."""
    if policy == "batch_k":
        ks = [min(ks)] * len(ks)
    drafts, qs, h = draft_rows(bt, xs, n, ks, eta, s, policy)  # 1. draft: h (B, K + 1, d)
    drafted = [len(d) for d in drafts]
    p_logits = bt.verify(h, n, drafted)  # 2. verify: (B, K + 1, V), one pass for all rows
    accepted, new = [], []
    for b, (d, k) in enumerate(zip(drafts, drafted)):  # 3. accept, each row by its own drafts
        p = p_logits[b, :k + 1]  # (k + 1, V)
        if s.temperature == 0:
            a, nxt = accept_greedy(p, d)
        else:
            a, nxt = accept_sampled(probs(p, s.temperature, s.top_p), torch.stack(qs[b]) if qs[b] else None, d,
                                    s.generator)
        accepted.append(a)
        new.append(d[:a] + [nxt])
    bt.crop(n, accepted, drafted, h)  # 4. each row keeps x and its accepted drafts
    K = h.shape[1] - 1
    return [RowRound(k, a, d, idle=K - k) for k, a, d in zip(drafted, accepted, drafts)], new


POLICIES = ("row", "batch_k", "batch_stop")


def check_policy(policy, eta):
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "batch_k" and eta != 0:
        raise ValueError(f"policy batch_k drafts a fixed k for every row, without eta: give eta 0, got {eta!r}")


def prefill(bt: Batch, s: Sampling):
    """M on the batch's prompts (left-padded), A on their exited states: each row's first token."""
    rows, model = bt.rows, bt.model
    real = rows.padding()
    ids = left_pad([rows.prompts[r] for r in rows.active], model.cfg.pad_token_id or 0, model.device)[0]  # (B, T)
    h = bt.shallow(ids, 0, real)  # (B, T, d)
    bt.prefill(h, real)
    logits = model.logits(bt.deep(h, 0), last_only=True)[:, -1]  # (B, V)
    for b, r in enumerate(rows.active):
        rows.tokens[r].append(int(logits[b].argmax()) if s.temperature == 0 else int(
            torch.multinomial(probs(logits[b], s.temperature, s.top_p), 1, generator=s.generator)))


def join(bt: Batch, b, r, s: Sampling):
    """Prompt r takes batch row b (a queue, ours): prefilled alone, as its run alone starts, then
    seated in the row's slots of every cache."""
    solo = Batch(bt.kg, bt.rows.alone(r), len(bt.rows.prompts[r]), bt.observe, bt.on_layer)
    prefill(solo, s)  # its first token, into the queue's record
    bt.seat(b, solo)


@torch.inference_mode()
def generate_kangaroo_batch(model, prompts, adapter=None, l=None, max_new_tokens=64, gamma=6, eta=0.6,
                            draft_vocab=None, temperature=0.0, top_p=1.0, generator=None, eos=None, on_round=None,
                            observe=None, on_layer=None, policy="row", batch_size=None):
    """generate_kangaroo (skip/kangaroo.py) over a list of prompts (lists of ids, any lengths) as
    one batch: one KangarooOutput per prompt, with RowRounds. on_round and observe as there, called
    once per row and told row=the prompt's index (the caches hold every row still in the batch).
    on_layer(layer, position, h, row=...): after every layer run, each row's output h (1, m, d) on
    its m real slots, from its own position (what the row's run alone reports as a LayerRun).
    policy: how many tokens each row drafts (POLICIES, this file's docstring). batch_size: how many
    rows decode at once, the other prompts waiting in a queue (this file's docstring); None: all."""
    check_policy(policy, eta)
    check_batch_size(batch_size, allow_none=True)
    prompts = check_settings(model.cfg, prompts, adapter, l, max_new_tokens, gamma, eta, temperature, top_p,
                             draft_vocab)
    s = Sampling(temperature, top_p, generator)
    rows = Rows(prompts, max_new_tokens, check_eos(model.cfg, eos), batch_size)
    # slots, holes included (model/cache.py), from a row's first (a queue trims the slots before every
    # row's first): a round moves n by the longest accepted row, at most gamma + 1, and a row lives at
    # most max_new_tokens - 1 rounds (each commits a token of it); and a round moves n by at most one
    # row's a + 1, never more than that row's remaining budget, so by at most every token of the prompts
    moved = min(len(prompts) * max_new_tokens, (max_new_tokens - 1) * (gamma + 1))
    room = max(map(len, prompts)) + moved + min(gamma, max_new_tokens) + 1
    bt = Batch(self_draft(model, adapter, l, draft_vocab, 0), rows, room, observe, on_layer)  # kg's caches: unused
    queued = bool(rows.queue)  # a static batch keeps its slots; a queue trims them (model/cache.py)
    prefill(bt, s)  # M on the prompts, A on their exited states
    while True:  # a row that meets EOS or max_new_tokens leaves the batch's work, or the next prompt takes its row
        before, (rows.active, keep_) = rows.active, boundary(rows.active, rows.queue, rows.done,
                                                             lambda b, r: join(bt, b, r, s))
        if keep_ is not None:
            bt.keep_rows(keep_)
        if not rows.active:
            return [KangarooOutput(t, r) for t, r in zip(rows.tokens, rows.rounds)]
        if queued and rows.active != before:
            bt.trim()
        rounds, new = round_rows(bt, rows.last(), rows.n, rows.budgets(gamma), eta, s, policy)
        rows.commit(rounds, new)
        assert bt.cache.lengths[0] == rows.n  # the caches end where the rows' next tokens go
        if on_round is not None:
            for r in rows.active:
                on_round(list(rows.tokens[r]), (bt.cache, bt.acache), row=r)
