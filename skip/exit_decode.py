"""Decoding with a per-token early exit, over a batch: the loop that the confidence baseline
(skip/baselines.py) and AdaInfer for generation (skip/adainfer_gen.py) share; only the exit
decision differs.

Each generated token runs the layers in order through `run_layers`, whose callback is a fresh
per-step check over the step's live rows. It is called after each layer with the outputs of the
rows still going (in row order) and answers, per row, None (go on) or the logits (V,) that the
row's next token is chosen from (it stops after that layer); after the last layer every row
stops. The layers above a row's exit have no keys or values for this position; `fill` says how
they get them:
    "propagate"  from the exited hidden state (CALM's state propagation: one K/V projection per layer)
    "recompute"  by running those layers for the token anyway (an exact cache, no saving there)

A batch (ours): every row stops at its own layer, and the pass runs until its deepest row stops,
because the rows share each layer's matrix products. A row that has exited keeps its exited
hidden state: fed into the deeper layers that still run for the other rows, that frozen state
yields exactly the keys/values that "propagate" fills (a layer's K/V with the exited state as
its input), and the row's outputs there are discarded; with "recompute" the row just runs on.
When every row has exited the pass stops, and the layers no row ran are filled as at batch 1.
Prompts of different lengths are left-padded, the padding kept by the cache (model/cache.py);
a row that ends (EOS or its budget) leaves the batch (KVCache.reorder), or with a queue the next
prompt takes its row (model/queue.py), so the depth is that of the rows decoding. One prompt is the same code at B = 1, with no pad mask, so its numerics
are those of the unbatched loop. Per token, `layers_run` is what the batch ran (the deepest
row's exit + 1) against what the row wanted (its own exit + 1), the cost of keeping a batch in step.

A check may screen a layer through a cheap head over frequent tokens (frequent_vocab) before the
full head. The two checks confirm a cheap stop by two different rules, because they stop on
different things: the confidence exit (baselines.ConfidenceCheck) stops on a probability, which a
head over fewer tokens can only overstate, so the full head re-checks the threshold; AdaInfer
(adainfer_gen.StopCheck) stops on a classifier's verdict over features with no such order, so the
full head must name the same top-1 token.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from model import (boundary, check_batch_size, check_eos, check_length, check_prompts, check_sampling, first_rows,
                   left_pad, next_token, positions)


@dataclass
class ExitDecode:
    tokens: list[int]
    exit_layers: list[int]  # per generated token fed back: the last layer it ran (L - 1 = no exit)
    logits: list[torch.Tensor]  # (V,) float32, the logits each token was chosen from
    # per generated token fed back: the layers its batch's pass ran (the deepest live row's exit + 1)
    layers_run: list[int] = field(default_factory=list)

    @property
    def layers_wanted(self):
        """Per generated token fed back: the layers this row alone would have run."""
        return [e + 1 for e in self.exit_layers]


def as_batch(prompts):
    """(a list of prompts, whether one prompt was given): a list of ids is one prompt; anything
    else is passed on as a batch, for model.check_prompts to take or refuse."""
    one = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and not isinstance(prompts[0], (list, tuple, str))
    return ([prompts] if one else prompts), one


def live_rows(going, B, *tensors):
    """The rows `going` (indices into B) of each (B, ...) tensor, as a run_layers callback hands a
    batch's outputs to the rows still deciding; the tensors themselves while every row goes."""
    if len(going) == B:
        return tensors
    rows = torch.tensor(going, device=tensors[0].device)
    return tuple(t[rows] for t in tensors)


def check_vocab(cfg, vocab):
    """A cheap head's ids: None (the full head), or token ids in [0, vocab_size), as a 1-D integer
    tensor on the CPU (each check moves it where it runs)."""
    if vocab is None:
        return None
    v = torch.as_tensor(vocab)
    if v.ndim != 1 or not len(v) or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        raise ValueError(f"vocab must be a non-empty list of token ids, got {v.dtype} of shape {tuple(v.shape)}")
    if not (0 <= int(v.min()) and int(v.max()) < cfg.vocab_size):
        raise ValueError(f"vocab must hold token ids in [0, {cfg.vocab_size})")
    return v.long().cpu()


def frequent_vocab(token_lists, n=2048):
    """The n most frequent ids in the model's own outputs, sorted: a cheap head for the checks."""
    counts = Counter(t for ts in token_lists for t in ts)
    return torch.tensor(sorted(t for t, _ in counts.most_common(n)))


def propagate(model, h, pos, cache, start, layers):
    """The exited hidden state h stands in for the input of every skipped layer."""
    for layer in layers:
        model.fill_kv(layer, h, pos, cache, start)


def exit_pass(model, h, pos, cache, start, pad_mask, check, fill):
    """One fed-back token per row (h (B, 1, d), its embeddings) through the layers until every
    row's check has stopped it; then the layers above the deepest exit are filled. Returns each
    row's exit layer and the logits (V,) it stopped with."""
    B, L = h.shape[0], model.cfg.n_layers
    exits, logits, going = [None] * B, [None] * B, list(range(B))
    frozen = h.new_empty(h.shape) if fill == "propagate" and B > 1 else None  # (B, 1, d) the exited states

    def callback(layer, h, attn_out, mlp_out):
        nonlocal going
        if frozen is not None and len(going) < B:  # deliberate, in place: run_layers feeds this very h to
            # the next layer (and returns it), so the exited rows' input there is their exit state
            done = torch.tensor([b for b in range(B) if exits[b] is not None], device=h.device)
            h[done] = frozen[done]
        h_live, attn_out, mlp_out = live_rows(going, B, h, attn_out, mlp_out)  # (b, 1, d) each
        stopped = []
        for i, (b, out) in enumerate(zip(going, check(layer, h_live, attn_out, mlp_out))):
            if out is not None:
                exits[b], logits[b] = layer, out
                stopped.append(i)
        if frozen is not None and stopped:
            frozen[[going[i] for i in stopped]] = h_live[stopped]
        going = [b for b in going if exits[b] is None]
        return not going
    h = model.run_layers(h, pos, cache=cache, start=start, pad_mask=pad_mask, callback=callback)
    skipped = range(max(exits) + 1, L)
    if fill == "propagate":  # h: every row's exit state
        propagate(model, h, pos, cache, start, skipped)
    else:  # the tokens stay the early ones; only the cache is completed
        model.run_layers(h, pos, layers=skipped, cache=cache, start=start, pad_mask=pad_mask)
    return exits, logits


@torch.inference_mode()
def decode_with_exit(model, prompts, new_check, max_new_tokens=32, eos=None, forced=None, fill="propagate",
                     batch_size=None, **sampling):
    """prompts: one prompt (token ids) -> an ExitDecode, or a list of them -> one per prompt.
    new_check(h, rows) -> the check of one step, given the embeddings h (b, 1, d) of its live rows
    and the prompt of each (rows: the indices into prompts, in batch order).
    forced: feed these tokens instead of the model's own (teacher forcing, for perplexity); with a
    batch, one list per prompt (each row's budget is its length).
    batch_size: how many rows decode at once, the other prompts waiting in a queue
    (model/queue.py); None: every prompt at once."""
    if fill not in ("propagate", "recompute"):
        raise ValueError(f"fill={fill!r}: 'propagate' or 'recompute'")
    check_batch_size(batch_size, allow_none=True)
    prompts, one = as_batch(prompts)
    prompts, eos = check_prompts(model.cfg, prompts), check_eos(model.cfg, eos)
    check_sampling(sampling.get("temperature", 0.0), sampling.get("top_p", 1.0), sampling.get("top_k", 0))
    if forced is not None:
        forced = check_prompts(model.cfg, [forced] if one else forced, "forced row")
        if len(forced) != len(prompts):
            raise ValueError(f"forced gives {len(forced)} rows for {len(prompts)} prompts")
    dev = model.device
    budget = [max_new_tokens] * len(prompts) if forced is None else [len(f) for f in forced]
    check_length(model.cfg, max(map(len, prompts)), max(budget))
    res = [ExitDecode([], [], []) for _ in prompts]

    def prefill(rows, cache):
        """The rows' prompts through every layer into cache: the logits (V,) of each one's first token."""
        ids, mask = left_pad([prompts[r] for r in rows], model.cfg.pad_token_id or 0, dev)  # (b, T)
        return list(model(ids, cache=cache, pad_mask=cache.open(ids.shape[1], mask), last_only=True)[:, -1])

    def pick(rows, logits):
        """Each row's next token from its logits (V,), or its forced one."""
        toks = next_token(torch.stack(logits).float(), **sampling).tolist() if forced is None else \
            [forced[r][len(res[r].tokens)] for r in rows]
        for r, lg, tok in zip(rows, logits, toks):
            res[r].logits.append(lg.float())
            res[r].tokens.append(tok)

    def ended(r):
        return (forced is None and res[r].tokens[-1] in eos) or len(res[r].tokens) == budget[r]

    def join(b, r):  # prompt r takes row b: prefilled alone, then seated (model/queue.py)
        solo = model.new_cache(1, len(prompts[r]))
        pick([r], prefill([r], solo))
        cache.seat(b, solo)

    live, queue = first_rows(len(prompts), batch_size)  # live: the prompt of each cache row
    queued = bool(queue)
    cache = model.new_cache(len(live), max(map(len, prompts)) + max(budget))  # and the home of the padding
    pick(live, prefill(live, cache))
    while True:
        before, (live, keep) = live, boundary(live, queue, ended, join)  # finished rows leave, or new ones join
        if not live:
            return res[0] if one else res
        if keep is not None:
            cache.reorder(torch.tensor(keep, device=dev))
        if queued and live != before:  # a static batch keeps its slots; a queue trims them (model/cache.py)
            cache.trim()
        start = cache.lengths[0]
        pad_mask = cache.open(1)  # (b, start + 1), or None when no live row is padded
        pos = positions(pad_mask, start, 1, dev)
        h = model.embed_tokens(torch.tensor([[res[r].tokens[-1]] for r in live], device=dev), pos)  # (b, 1, d)
        exits, logits = exit_pass(model, h, pos, cache, start, pad_mask, new_check(h, live), fill)
        for r, e in zip(live, exits):
            res[r].exit_layers.append(e)
            res[r].layers_run.append(max(exits) + 1)
        pick(live, logits)
