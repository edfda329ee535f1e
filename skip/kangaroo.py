"""Kangaroo: lossless self-speculative decoding via double early exiting
(Liu et al. 2024, arXiv 2404.18911; official code github.com/Equationliu/Kangaroo).

Notation (the paper's method section):
    M        the full model, layers [0, L); M^s = layers [0, l), the shallow sub-network
    A        the adapter: RMSNorm -> attention (M's head layout, RoPE) -> + residual -> RMSNorm
    H        M's frozen LM head; the draft model is M^d = H . A . M^s        (layer early exit)
    gamma    at most gamma draft steps per round
    eta      drafting stops after a draft whose top probability is below eta (draft early exit)
    p, q     target (M) and draft (M^d) distributions of the next token

Paper sections are cited by title: [SD] "Early Exiting as Self-Drafting Model" (M^d, A, the
verification of the exited states) and [DD] "Dynamic Drafting Steps with Early-Exiting" (eta).
One round, from the last committed token x at slot n (not cached yet):
  1. draft [DD]: M^s on x, then A and H -> d_1; M^s on d_1, A, H -> d_2; ... M^s keeps its
     keys/values, and the exited states h_l of x, d_1, ..., d_k are kept too.
  2. verify [SD]: layers [l, L) run once on those k + 1 states (M^s never runs twice on a slot).
  3. accept: the longest prefix of drafts that M agrees with, plus M's own next token:
     d_i while d_i = argmax p_i, so the output equals plain greedy decoding (the official code
     decodes greedily). Sampled decoding, added here, takes the speculative sampling rule
     (Leviathan et al. 2023, Alg. 1; Chen et al. 2023): d_i with probability
     min(1, p_i(d_i) / q_i(d_i)), else a draw from norm(max(0, p_i - q_i)), which keeps every
     token distributed exactly as p.
  4. crop every cache (shallow, deep, adapter) to the accepted length (as the official code does).
Ours, in the steps above: a batch of prompts of different lengths, each row as if alone (greedy:
exactly; sampled: in distribution, the rows sharing one generator) (each drafts to its own eta or k, one verification pass for all, each row accepts and crops its
own; the rows share the caches' slots, model/cache.py; the rows' bookkeeping: skip/kangaroo_batch.py).
After the divider, ours: an imported adapter's own settings, the top-K draft head, the
adapter-free peer and the hook of traces. A: skip/kangaroo_adapter.py (its files: skip/kangaroo_files.py;
training it: skip/kangaroo_train.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from model import attention_mask, check_length, check_sampling, filter_logits, left_pad, positions
from model.flops import AttnRun, HeadRun

from .kangaroo_batch import Rows


# ---------------------------------------------------------------- acceptance rules
def accept_greedy(p_logits, drafts):
    """p_logits (k+1, V), drafts (k,) -> (accepted count a, M's token after them)."""
    target = p_logits.argmax(-1).tolist()
    a = 0
    while a < len(drafts) and drafts[a] == target[a]:
        a += 1
    return a, target[a]


def accept_sampled(p, q, drafts, generator=None):
    """Speculative sampling (Leviathan et al. 2023, Alg. 1). p (k+1, V) and q (k, V) are
    probabilities; d_i was drawn from q_i. Returns (accepted count a, next token)."""
    for i, d in enumerate(drafts):
        r = torch.rand((), generator=generator, device=p.device)
        if r * q[i, d] < p[i, d]:  # r < p/q: accept with probability min(1, p/q)
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # norm(max(0, p - q))
        if residual.sum() <= 0:  # only by rounding, when p == q
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))  # bonus token


def probs(logits, temperature, top_p):
    """The sampling distribution; the same transform for p and q keeps the rule lossless."""
    return filter_logits(logits.float() / temperature, top_p=top_p).softmax(-1)


# ---------------------------------------------------------------- the draft model's two pieces
def adapt(model, A, h, cache, start, pad_mask=None):
    """A's output (B, T, d) on exited states h (B, T, d) at slots [start, start + T) of its cache,
    reading and extending it; pad_mask (B, start + T): the slots that hold a row's state, None for
    all (M's observers are told: FLOPs)."""
    B, T = h.shape[:2]
    pos = positions(pad_mask, start, T, h.device)  # (B|1, T): each row's own positions
    z = A(h, A.rope(model, pos), cache, start, attention_mask(pad_mask, start, T, h.device), model.attn_impl)
    model.emit(AttnRun(B, T, start))
    return z


def head(model, z, H):
    """The head's rows H (V', d) on z (B, d): logits (B, V') (M's observers are told: FLOPs)."""
    model.emit(HeadRun(z.shape[0], 1, H.shape[0]))
    return z @ H.T


# ---------------------------------------------------------------- decoding
class Sampling(NamedTuple):
    temperature: float  # 0: greedy
    top_p: float
    generator: torch.Generator | None


@dataclass
class Round:
    drafted: int  # k: draft tokens proposed
    accepted: int  # a: how many of them M accepted (the round yields a + 1 tokens)
    drafts: list = field(default_factory=list)  # d_1..d_k
    # ours, batched: what the row's share of the batch's verification wasted (0 for one row)
    idle: int = 0  # verified positions after the row stopped drafting (the batch's longest k minus its k)
    holes: int = 0  # the row's padding and holes among the slots before n (keys its attention skips)


@dataclass
class KangarooOutput:
    tokens: list
    rounds: list = field(default_factory=list)


class Kangaroo:
    """M split at A's exit layer l, for one decoding of B rows [SD]: M^d = H . A . M^s and M share
    M^s (its layers and their KV cache) and H; A keeps a KV cache of its own. Ours: rows share each
    cache's slots; which slots hold a row's states is that cache's `valid` mask, and a row's
    positions count them (model/cache.py). A's mask is its own: A reads a row's last accepted
    state a round late when the row accepted every draft (draft_logits), in A's next slot, so A's
    slots may run ahead of M's by one a round while each state keeps the row's own position."""

    def __init__(self, model, adapter, batch, max_len, catch_ups=0):
        self.model, self.A, self.l, self.H = model, adapter, adapter.l, model.head.weight  # H: (V, d)
        # A's catch-ups (draft_logits) take slots of their own: at most one a round, none for one row
        self.cache, self.acache = model.new_cache(batch, max_len), adapter.new_cache(batch, max_len + catch_ups)
        self.last_h = None  # (B, 1, d) each row's last draft's h_l, which A has not read when every draft was accepted
        self.lags = [False] * batch  # which rows A has to catch up

    def shallow(self, ids, start, real):
        """M^s on ids (B, T) at slots [start, start + T), real (B, T) bools (False: padding or a
        stopped row's filler): the exited states h_l (B, T, d)."""
        mask = self.cache.open(real)  # None while every slot is real: one row runs as it always did
        pos = positions(mask, start, ids.shape[1], ids.device)  # (B|1, T)
        return self.model.run_layers(self.model.embed_tokens(ids, pos), pos, range(self.l), self.cache, start, mask)

    def deep(self, h_l, start):
        """Layers [l, L) on exited states h_l (B, T, d) at slots [start, start + T), opened by shallow."""
        mask = self.cache.pad_mask(start + h_l.shape[1])
        pos = positions(mask, start, h_l.shape[1], h_l.device)  # (B|1, T)
        return self.model.run_layers(h_l, pos, range(self.l, self.model.cfg.n_layers), self.cache, start, mask)

    def prefill(self, h_l, real):
        """A reads the prompts' exited states (B, T, d) into its cache."""
        adapt(self.model, self.A, h_l, self.acache, 0, self.acache.open(real))

    def draft_logits(self, h_l, drafting):
        """M^d's logits (B, V') of each row's next token, from the exited state h_l (B, 1, d) of its
        newest slot; drafting (B,) bools: the rows that draft now (the others' are filler)."""
        real = [[d] for d in drafting]
        if any(lag and d for lag, d in zip(self.lags, drafting)):  # the last round accepted every draft,
            # so A never read the last draft's state (it verified, not drafted, after it): A reads it
            # now, with this one (the official evaluation/inference_kangaroo.py fills that missing
            # adapter KV the same way); for a batch, in a slot of A's own (model/cache.py)
            real = [[lag and d, d] for lag, d in zip(self.lags, drafting)]
            h_l = torch.cat([self.last_h, h_l], 1)  # (B, 2, d)
            self.lags = [lag and not d for lag, d in zip(self.lags, drafting)]
        start = self.acache.lengths[0]
        return head(self.model, adapt(self.model, self.A, h_l, self.acache, start, self.acache.open(real))[:, -1],
                    self.H)

    def pick(self, z, s: Sampling):
        """M^d's token from its logits z (V'), the confidence that the second exit compares with eta
        (the token's probability when greedy, q's top probability when sampling) and q (sampling only)."""
        if s.temperature == 0:
            j = int(z.argmax())
            return j, float(z.float().softmax(-1)[j]), None
        q = probs(z, s.temperature, s.top_p)  # (V)
        return int(torch.multinomial(q, 1, generator=s.generator)), float(q.max()), q

    def verify(self, h_l, n, drafted):
        """[SD]: M's logits (B, K + 1, V) at slots [n, n + K], from the exited states h_l (B, K + 1, d);
        row b's after its own drafted[b] + 1 are filler (drafted is for the trace hook, `observed`)."""
        return self.model.logits(self.deep(h_l, n))

    def crop(self, n, accepted, drafted, h_l):
        """Row b keeps its first accepted[b] + 1 slots from n in every cache (x and the accepted
        drafts): the caches end at the longest row, the rest of each row become holes (one row: a
        plain crop). h_l (B, K + 1, d): the round's exited states."""
        kept = [a + 1 for a in accepted]
        keep(self.cache, n, kept)
        keep(self.acache, self.acache.lengths[0] - max(drafted), kept)  # from A's slot of the round's first draft
        self.last_h = h_l[torch.arange(len(kept), device=h_l.device), drafted][:, None]  # (B, 1, d) at n + k_b
        self.lags = [a == k for a, k in zip(accepted, drafted)]

    def keep_rows(self, rows):
        """Drop the finished rows: row i becomes the old row rows[i]."""
        for cache in (self.cache, self.acache):
            cache.reorder(rows)
        self.last_h = None if self.last_h is None else self.last_h[rows]  # None: before the first round
        self.lags = [self.lags[r] for r in rows]


def keep(cache, start, kept):
    """Row b keeps its first kept[b] slots from start: the cache ends at the longest row, and the
    rest of each row become holes (model/cache.py)."""
    cache.crop(start + max(kept))
    cache.hide(start, kept)


def draft(kg: Kangaroo, xs, n, ks, eta, s: Sampling):
    """[DD]: from each row's x at slot n, M^s (the first exit; its keys/values stay cached) and M^d
    propose at most k tokens; drafting stops after a draft whose probability is below eta (the
    second exit). Returns each row's d_1..d_k and their q (sampling), and the exited states h_l
    (B, K + 1, d) of x, d_1, ..., d_k, K the most any row drafted: the last draft is verified too,
    since its h_l is computed anyway (as in the official code). Ours: a row that has stopped waits
    in the batch while others draft; its slots are filler, never accepted."""
    drafts, qs, hs = [[] for _ in xs], [[] for _ in xs], []
    # going: the rows whose token at n + i is real, then those that draft from it; conf starts at 1,
    # so every row with k >= 1 drafts once (the official code tests eta only from its second step)
    going, conf, toks = [True] * len(xs), [1.0] * len(xs), list(xs)
    for i in range(max(ks) + 1):
        ids = torch.tensor(toks, device=kg.model.device)[:, None]  # (B, 1): a stopped row's is filler
        hs.append(kg.shallow(ids, n + i, [[g] for g in going]))  # (B, 1, d)
        going = [g and i < k and c >= eta for g, k, c in zip(going, ks, conf)]  # the rows that draft at n + i
        if not any(going):
            break
        z = kg.draft_logits(hs[-1], going)  # (B, V')
        for b in (b for b, g in enumerate(going) if g):
            toks[b], conf[b], q = kg.pick(z[b], s)
            drafts[b].append(toks[b])
            qs[b].append(q)
    return drafts, qs, torch.cat(hs, 1)


def kangaroo_round(kg: Kangaroo, xs, n, ks, eta, s: Sampling):
    """One round from each row's x at slot n, row b drafting at most ks[b]: draft, verify, accept,
    crop. Returns each row's Round and the a + 1 tokens it commits."""
    drafts, qs, h = draft(kg, xs, n, ks, eta, s)  # 1. draft: h (B, K + 1, d)
    drafted = [len(d) for d in drafts]
    p_logits = kg.verify(h, n, drafted)  # 2. verify: (B, K + 1, V), one pass for all rows
    accepted, new = [], []
    for b, (d, k) in enumerate(zip(drafts, drafted)):  # 3. accept, each row by its own drafts
        p = p_logits[b, :k + 1]  # (k + 1, V)
        if s.temperature == 0:  # the longest prefix M's greedy choice agrees with, plus M's token
            a, nxt = accept_greedy(p, d)
        else:
            a, nxt = accept_sampled(probs(p, s.temperature, s.top_p), torch.stack(qs[b]) if qs[b] else None, d,
                                    s.generator)
        accepted.append(a)
        new.append(d[:a] + [nxt])
    kg.crop(n, accepted, drafted, h)  # 4. keep x and the accepted drafts; drop the rest from every cache
    K = h.shape[1] - 1
    return [Round(k, a, d, idle=K - k) for k, a, d in zip(drafted, accepted, drafts)], new


@torch.inference_mode()
def generate_kangaroo(model, prompt, adapter=None, l=None, max_new_tokens=64, gamma=6, eta=0.6,
                      draft_vocab=None, temperature=0.0, top_p=1.0, generator=None, eos=None, on_round=None,
                      observe=None):
    """Kangaroo decoding of one prompt (a list of token ids) with adapter A: the tokens and rounds.
    Ours (below the divider): a list of prompts (lists of ids, any lengths) decodes as one batch and
    returns one output per prompt, each row as if alone (sampled: in distribution); adapter=None drafts with M's own final norm
    and head on h_l (the adapter-free peer; then give l); draft_vocab=K restricts the draft head to
    A's K most frequent tokens; on_round(tokens, (cache, adapter cache)) runs after each round's
    crop (for tests); observe sees each draft's and each verification's logits (for traces; see
    `observed`). Batched, both are called once per row and told row=the prompt's index (the
    caches hold every row still in the batch)."""
    batched = bool(prompt) and isinstance(prompt[0], (list, tuple))  # one prompt is a batch of one
    prompts = [list(p) for p in prompt] if batched else [prompt]
    check_settings(model.cfg, prompts, adapter, l, max_new_tokens, gamma, eta, temperature, top_p, draft_vocab)
    B, s = len(prompts), Sampling(temperature, top_p, generator)
    rows = Rows(prompts, max_new_tokens, set(model.cfg.eos_token_id if eos is None else eos))
    room = rows.T + B * max_new_tokens + min(gamma, max_new_tokens) + 1  # slots, holes included (model/cache.py)
    kg = self_draft(model, adapter, l, draft_vocab, B, room, max_new_tokens if B > 1 else 0)
    kg = kg if observe is None else observed(kg, observe, rows.active if batched else None)

    # prefill: M on the prompts, A on their exited states
    real = rows.padding()
    h = kg.shallow(left_pad(prompts, model.cfg.pad_token_id or 0, model.device)[0], 0, real)  # (B, T, d)
    kg.prefill(h, real)
    logits = model.logits(kg.deep(h, 0), last_only=True)[:, -1]  # (B, V)
    for b in range(B):
        rows.tokens[b].append(int(logits[b].argmax()) if temperature == 0 else
                              int(torch.multinomial(probs(logits[b], temperature, top_p), 1, generator=generator)))
    while True:  # a row that meets EOS or max_new_tokens leaves the batch's work
        if (keep := rows.leave()) is not None:
            kg.keep_rows(keep)
        if not rows.active:
            outs = [KangarooOutput(t, r) for t, r in zip(rows.tokens, rows.rounds)]
            return outs if batched else outs[0]
        rounds, new = kangaroo_round(kg, rows.last(), rows.n, rows.budgets(gamma), eta, s)
        rows.commit(rounds, new)
        assert kg.cache.lengths[0] == rows.n  # the caches end where the rows' next tokens go
        if on_round is not None:
            for r in rows.active:
                on_round(list(rows.tokens[r]), (kg.cache, kg.acache), **({"row": r} if batched else {}))


# ================================================================ ours: extensions
class TopKDraft(Kangaroo):
    """M^d's head restricted to A's K most frequent tokens, for models whose head dominates a draft
    step. Verification keeps the full head, so the output does not change; eta then applies to the
    draft's probability renormalised over those K tokens."""

    def __init__(self, model, adapter, batch, max_len, catch_ups, K):  # K checked by check_settings
        super().__init__(model, adapter, batch, max_len, catch_ups)
        self.vocab = adapter.frequent[:K].to(model.device)  # (K,) the token id of each row
        self.H = self.H[self.vocab].contiguous()  # (K, d), gathered once, not per step

    def pick(self, z, s):  # row j is token vocab[j]; q is spread over all V tokens, as p is
        j, conf, q = super().pick(z, s)
        if q is not None:
            q = q.new_zeros(self.model.cfg.vocab_size).index_put_((self.vocab,), q)  # (V)
        return int(self.vocab[j]), conf, q


class LensDraft(Kangaroo):
    """The adapter-free peer: M's own final norm and head read h_l (the logit lens at layer l)."""

    def __init__(self, model, l, batch, max_len):  # no A, so no adapter cache
        self.model, self.A, self.l, self.H = model, None, l, model.head.weight
        self.cache, self.acache = model.new_cache(batch, max_len), None

    def prefill(self, h_l, real):
        pass

    def draft_logits(self, h_l, drafting):
        return self.model.logits(h_l)[:, -1]  # (B, V)

    def crop(self, n, accepted, drafted, h_l):
        keep(self.cache, n, [a + 1 for a in accepted])

    def keep_rows(self, rows):
        self.cache.reorder(rows)


def self_draft(model, adapter, l, draft_vocab, batch, max_len, catch_ups):
    """The Kangaroo of these settings: the paper's, or one of ours."""
    if draft_vocab:
        return TopKDraft(model, adapter, batch, max_len, catch_ups, draft_vocab)
    return Kangaroo(model, adapter, batch, max_len, catch_ups) if adapter is not None else LensDraft(model, l, batch,
                                                                                                      max_len)


def observed(kg, observe, rows):
    """kg, with observe(kind, h_l, logits, ids) shown each row's draft ("draft": its exited state
    (1, 1, d), M^d's logits (V'), the token id of each of their rows or None for all V) and each
    row's verification ("verify": its k + 1 exited states (1, k + 1, d), M's logits (k + 1, V),
    None), as skip/trace.py records them; rows: None for one prompt, else the list giving each
    batch row's prompt index, passed as row=."""
    draft_logits, verify, ids = kg.draft_logits, kg.verify, getattr(kg, "vocab", None)

    def tell(kind, b, h_l, logits, ids):
        observe(kind, h_l, logits, ids, **({} if rows is None else {"row": rows[b]}))

    def draft_seen(h_l, drafting):
        z = draft_logits(h_l, drafting)  # (B, V')
        for b in (b for b, d in enumerate(drafting) if d):
            tell("draft", b, h_l[b:b + 1], z[b], ids)
        return z

    def verify_seen(h_l, n, drafted):
        logits = verify(h_l, n, drafted)  # (B, K + 1, V)
        for b, k in enumerate(drafted):
            tell("verify", b, h_l[b:b + 1, :k + 1], logits[b, :k + 1], None)
        return logits
    kg.draft_logits, kg.verify = draft_seen, verify_seen  # this instance only
    return kg


def check_settings(cfg, prompts, adapter, l, max_new_tokens, gamma, eta, temperature, top_p, draft_vocab=None):
    """Refuse bad settings before anything is allocated."""
    l = adapter.l if adapter is not None else l
    if l is None or not 0 < l < cfg.n_layers:
        raise ValueError(f"need an exit layer 0 < l < {cfg.n_layers} (or an adapter), got {l}")
    if not (isinstance(gamma, int) and not isinstance(gamma, bool) and gamma >= 0
            and isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"need an integer gamma >= 0 and 0 <= eta <= 1 (got {gamma!r}, {eta!r})")
    n_frequent = 0 if adapter is None else len(adapter.frequent)  # -1 would drop a token, 0 mean "none"
    if draft_vocab is not None and not (isinstance(draft_vocab, int) and not isinstance(draft_vocab, bool)
                                        and 1 <= draft_vocab <= n_frequent):
        raise ValueError(f"draft_vocab must be None or an integer in [1, {n_frequent}] (the adapter's frequent "
                         f"tokens), got {draft_vocab!r}")
    check_sampling(temperature, top_p)
    if not prompts or not all(prompts) or any(not 0 <= t < cfg.vocab_size for p in prompts for t in p):
        raise ValueError(f"a prompt must be non-empty token ids in [0, {cfg.vocab_size})")
    check_length(cfg, max(map(len, prompts)), max_new_tokens)
