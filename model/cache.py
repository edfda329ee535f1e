"""Preallocated KV cache, indexed by slot, with an explicit valid length per layer.

A slot is a column of the (B, max_len) buffer: slot t holds one token of every row, a real
one, left padding, or (batched speculative decoding, below) a hole. The cache is the one home of
padding and holes: every decoder that batches (model/generate.py's greedy, sampling and beam
search, the early exits, batched Kangaroo) opens each slot here and passes on what open() returns. Each layer l holds keys/values for slots
[0, lengths[l]) and nothing else, so layers may run ahead of one another:
- Kangaroo's shallow layers draft ahead of the deep ones;
- Unified Layer Skipping's skipped layers stop at the prompt length forever;
- an early-exit method may fill a skipped layer's slots from another state
  (Decoder.fill_kv) or leave them, in which case that layer can never run again.
Writes must start exactly at a layer's length, so a layer can never attend to a slot
it did not fill: the gap raises instead of reading stale memory.
Rolling back rejected drafts is crop().
Memory grows with use, in chunks of CHUNK slots, up to max_len: a generous max_new_tokens
or gamma bounds the cache but does not allocate it.

Rows that advance by different amounts (batched speculative decoding: each row accepts its
own number of drafts) share the slots and differ in which slots are real: `valid` (B, S) is
the decoder's pad_mask, False on left padding AND on holes (a row's rejected
drafts, or filler where a row waits while others draft). A row's RoPE position at a slot is
the count of its real slots before it (decoder.positions), and attention reads only real
keys, so a row sees exactly the keys and positions it would see alone. `valid` is None while
every slot of every row is real (one row, no padding; and again when the rows left after a
reorder(), shift() or trim() are all real), so such a run passes pad_mask=None exactly as an unbatched one does. Why shared slots rather than a length per row: every
write stays one dense slice [start, start + T) for all rows, as for a single row, and crop()
stays one number; per-row lengths would need scattered writes and a per-row gather of keys
in every layer. The cost: holes are slots that every row's attention spans and skips, at
most gamma per row per round (a round keeps the longest accepted row, n + max a_i + 1, and
shorter rows keep holes); so max_len counts slots, not tokens, and a batch of B rows can
use up to B times a single row's slots in the worst case (one row advancing per round).
open() adds slots' columns before their first layer writes them, hide() turns a row's
rejected slots into holes, reorder() drops finished rows (or copies beams).

A row that leaves takes its slots with it (reorder drops the row); nothing is cleared, because a
write always precedes a read of the same slot and `valid` says which slots are a row's.

A queue of prompts through B rows (ours, as servers decode: model/queue.py) reuses a finished
row for the next prompt: seat() copies the prompt's slots, prefilled alone in a one-row cache,
into the row, right-aligned to end where the other rows' next tokens go; the row's older slots
become its left padding (its keys stay, unread), so its RoPE positions restart at 0 and it sees
exactly its own keys. A prompt longer than the slots so far first gives every row more left
padding (shift). A queue then calls trim() at every step whose rows changed, dropping the
leading slots that are padding in every row, so the slots in use are those of the widest row in the batch, not of
everything the queue has decoded; a static batch (every prompt at once) keeps its slots.

A sliding attention window (Mistral, Qwen) evicts nothing either: every slot stays, so crop()
still rolls back, and the window is part of the mask (decoder.attention_mask, counted in a row's
positions like RoPE, so holes and padding do not shrink it); attention then reads only the last
slots any query sees, as transformers' sliding cache holds them.
"""
from __future__ import annotations

import torch


class CacheError(RuntimeError):
    pass


CHUNK = 256


class KVCache:
    def __init__(self, n_layers, batch, max_len, n_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
        empty = (n_layers, batch, n_kv_heads, 0, head_dim)
        self.k = torch.zeros(empty, dtype=dtype, device=device)  # (L, B, n_kv, capacity, hd)
        self.v = torch.zeros(empty, dtype=dtype, device=device)  # (L, B, n_kv, capacity, hd)
        self.lengths = [0] * n_layers
        self.max_len = max_len
        self.opened = 0  # slots whose columns open() has added
        # (B, capacity) bool: its first `opened` columns False on a row's padding and holes; None: all real
        self.valid = None

    def _capacity(self, end):
        return max(end, min(self.max_len, -(-end // CHUNK) * CHUNK))  # next multiple of CHUNK, at most max_len

    def _grow(self, end):
        capacity = self._capacity(end)
        old = self.k.shape[3]
        for name in ("k", "v"):
            t = getattr(self, name)
            grown = t.new_zeros(t.shape[:3] + (capacity, t.shape[4]))  # (L, B, n_kv, capacity, hd)
            grown[:, :, :, :old] = t
            setattr(self, name, grown)

    @classmethod
    def for_model(cls, cfg, batch, max_len, dtype=torch.float32, device="cpu"):
        return cls(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype, device)

    def write(self, layer, start, k, v):
        """Store k, v (B, n_kv, T, hd) at slots [start, start+T); return all valid k, v."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise CacheError(f"KV cache holds {self.max_len} positions; asked to write slots "
                             f"[{start}, {end}). Make a larger cache (max_len).")
        if start != self.lengths[layer]:
            raise CacheError(f"layer {layer} holds {self.lengths[layer]} valid positions; cannot write "
                             f"at slot {start} (crop it, or fill slots {self.lengths[layer]}..{start - 1} first)")
        if end > self.k.shape[3]:
            self._grow(end)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        self.lengths[layer] = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, end, hd)

    def reorder(self, rows):
        """Row i becomes the old row rows[i] (B', ): beam search copies and drops beams this way."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]  # (L, B', n_kv, capacity, hd)
        if self.valid is not None:
            self.valid = self.valid[rows]  # (B', capacity)
            self._drop_mask_if_all_real()

    def crop(self, length, layers=None):
        """Forget every slot >= length (in the given layers, default all, with their columns)."""
        for i in range(len(self.lengths)) if layers is None else layers:
            self.lengths[i] = min(self.lengths[i], length)
        if layers is None and self.opened > length:
            self.opened = length  # the columns past it are written again by open() before they are read

    # ------------------------------------------------ a queue: rows reused for new prompts (ours)
    def seat(self, row, solo):
        """Row `row` takes the slots of `solo`, a one-row cache holding a prompt prefilled alone,
        right-aligned to end where every layer of this cache ends; the row's earlier slots become
        its padding. Every layer of both caches must end at one slot."""
        end, P = self._end(), solo._end()
        if P > end:  # a prompt longer than every row so far: room on the left for it
            self.shift(P - end)
            end = P
        self._mark(self.k.shape[1])
        self.k[:, row, :, end - P:end] = solo.k[:, 0, :, :P]  # (L, n_kv, P, hd)
        self.v[:, row, :, end - P:end] = solo.v[:, 0, :, :P]
        self.valid[row, :end] = False
        self.valid[row, end - P:end] = True if solo.valid is None else solo.valid[0, :P]

    def shift(self, d):
        """Move every slot d columns: d > 0 gives every row d more slots of left padding; d < 0 drops
        the first -d slots, which must be padding in every row. Positions count a row's real slots,
        so none changes."""
        S = self._end()
        if d < 0 and (self.valid is None or bool(self.valid[:, :-d].any())):
            raise CacheError(f"cannot drop the first {-d} slots: some row holds a real token there")
        if S + d > self.max_len:
            raise CacheError(f"KV cache holds {self.max_len} positions; a shift by {d} needs {S + d}. "
                             f"Make a larger cache (max_len).")
        cap = self._capacity(S + d)
        for name in ("k", "v"):
            t = getattr(self, name)
            moved = t.new_zeros(t.shape[:3] + (cap, t.shape[4]))  # (L, B, n_kv, cap, hd)
            moved[:, :, :, max(d, 0):S + d] = t[:, :, :, max(-d, 0):S]
            setattr(self, name, moved)
        if d > 0:
            self._mark(self.k.shape[1])  # the new padding needs a mask (over the S slots opened so far)
        if self.valid is not None:
            moved = self.valid.new_zeros(self.valid.shape[0], cap)  # (B, cap)
            moved[:, max(d, 0):S + d] = self.valid[:, max(-d, 0):S]
            self.valid = moved
        self.lengths = [S + d] * len(self.lengths)
        self.opened = S + d
        self._drop_mask_if_all_real()

    def trim(self):
        """Drop the leading slots that are padding in every row; returns how many (every slot moves
        left by as many)."""
        if self.valid is None:
            return 0
        f = int(self.valid[:, :self._end()].any(0).int().argmax())  # the first slot real in some row
        if f:
            self.shift(-f)
        else:
            self._drop_mask_if_all_real()  # a seated row may have left every slot real
        return f

    def _end(self):
        if len(set(self.lengths)) > 1 or self.opened != self.lengths[0]:
            raise CacheError(f"the layers end at slots {sorted(set(self.lengths))} and {self.opened} slots are open; "
                             f"a row can be seated or slots moved only when every layer ends at the last open slot")
        return self.lengths[0]

    # ------------------------------------------------ which slots are real, per row
    def open(self, T, real=None):
        """Add the columns of the next T slots, before their first layer writes them: real (B, T)
        bools (a tensor or nested lists), False for a row's padding or filler; None: all real.
        Returns pad_mask(), what the decoder reads for these slots."""
        end = self.opened + T
        if real is not None:
            real = torch.as_tensor(real, dtype=torch.bool, device=self.k.device)  # (B, T)
            if not bool(real.all()):
                self._mark(real.shape[0])
        if self.valid is not None:
            if self.valid.shape[1] < end:  # grown in chunks, as the keys and values: no copy a step
                grown = self.valid.new_ones(self.valid.shape[0], self._capacity(end))  # (B, capacity)
                grown[:, :self.opened] = self.valid[:, :self.opened]
                self.valid = grown
            self.valid[:, self.opened:end] = True if real is None else real
        self.opened = end
        return self.pad_mask(end)

    def _drop_mask_if_all_real(self):
        """The rows left are all real (after a reorder, shift or seat): an unpadded batch, no mask."""
        if self.valid is not None and bool(self.valid[:, :self.opened].all()):
            self.valid = None

    def _mark(self, B):
        """Make the mask, every slot so far real, before the first padding or hole is marked."""
        if self.valid is None:
            self.valid = torch.ones(B, self.opened, dtype=torch.bool, device=self.k.device)  # (B, opened)

    def pad_mask(self, end):
        """The (B, end) mask that the decoder reads (True: a real token), or None when all are real."""
        return None if self.valid is None else self.valid[:, :end]

    def hide(self, start, kept):
        """Row b keeps kept[b] of the slots from start on; its later slots become holes."""
        if all(start + k >= self.opened for k in kept):
            return
        self._mark(len(kept))
        slot = torch.arange(start, self.opened, device=self.k.device)  # (S - start,)
        ends = torch.tensor(kept, device=self.k.device)[:, None] + start  # (B, 1)
        self.valid[:, start:self.opened] &= slot < ends  # (B, S - start)
