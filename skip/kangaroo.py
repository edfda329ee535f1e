"""Kangaroo: lossless self-speculative decoding via double early exiting
(Liu et al. 2024, arXiv 2404.18911; official code github.com/Equationliu/Kangaroo).

Notation (the paper's method section):
    M        the full model, layers [0, L); M^s = layers [0, l), the shallow sub-network
    A        the adapter: RMSNorm -> attention (M's head layout, RoPE) -> + residual -> RMSNorm
    H        M's frozen LM head; the draft model is M^d = H . A . M^s        (layer early exit)
    gamma    at most gamma draft steps per round
    eta      drafting stops after a draft whose top probability is below eta (draft early exit)
    p, q     target (M) and draft (M^d) distributions of the next token
    V'       the draft head's rows: all V tokens (ours, TopKDraft: the adapter's K most frequent)

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

How A catches up after a round that accepted every draft. In a round, A reads x, d_1, ...,
d_{k-1} (each to draft the next) but never d_k, whose state only went to verification; when d_k
is accepted, A's cache lacks it. We catch A up a round late: the next round's first draft call
reads d_k's state and that round's x together, as the official evaluation/inference_kangaroo.py
fills that missing adapter KV. Catching up at once, as gpt-fast feeds its draft model the last
token, would cost one more A call a round and could round A's keys differently from the official
code's, which this file is checked against draft for draft. (A round with no draft, k = 0, drops
the pending state unread; that happens only with gamma = 0, when A never drafts, or in the last
round, when there is no next one.)

This file decodes one sequence. Ours, elsewhere: a batch of prompts with each row as if alone
(skip/kangaroo_batch.py, bound to this file by tests/test_kangaroo_batch.py; the pad_mask
arguments below are for it); A itself in skip/kangaroo_adapter.py (its files:
skip/kangaroo_files.py; training it: skip/train/kangaroo.py). After the divider, ours: the top-K
draft head, the adapter-free peer (drafting with M's own head, as transformers'
assistant_early_exit does: skip/peer_layerskip.py) and the hook of traces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from model import attention_mask, check_eos, check_length, check_prompts, check_sampling, filter_logits, positions
from model.config import is_int
from model.flops import AttnRun, HeadRun


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
    reading and extending it; reported to M's observers (model.emit), so FLOPs records count it.
    A's attention is layer l's, sliding window included (Mistral, Qwen)."""
    B, T = h.shape[:2]
    pos = positions(pad_mask, start, T, h.device)  # (B|1, T)
    window = model.windows[A.l]
    z = A(h, A.rope(model, pos), cache, start, attention_mask(pad_mask, start, T, h.device, window), model.attn_impl)
    model.emit(AttnRun(B, T, start, window))
    return z


def head(model, z, H):
    """The head's rows H (V', d) on z (B, d): logits (B, V'), reported to M's observers. A plain
    product: H may be a gathered subset of the head's rows (TopKDraft), not the head's Linear."""
    model.emit(HeadRun(z.shape[0], 1, H.shape[0]))
    return z @ H.T


# ---------------------------------------------------------------- decoding
class Sampling(NamedTuple):
    temperature: float  # 0: greedy
    top_p: float
    generator: torch.Generator | None


@dataclass
class Round:
    drafted: int  # k: draft tokens proposed (at most the round's gamma)
    accepted: int  # a: how many of them M accepted (the round yields a + 1 tokens)
    drafts: list = field(default_factory=list)  # d_1..d_k


@dataclass
class KangarooOutput:
    tokens: list
    rounds: list = field(default_factory=list)


class Kangaroo:
    """M split at A's exit layer l, for one sequence [SD]: M^d = H . A . M^s and M share M^s (its
    layers and their KV cache) and H; A keeps a KV cache of its own, slot for slot with M's."""

    def __init__(self, model, adapter, max_len):
        self.model, self.A, self.l, self.H = model, adapter, adapter.l, model.head.weight  # H: (V, d)
        self.cache, self.acache = model.new_cache(1, max_len), adapter.new_cache(1, max_len)
        self.pending = None  # (1, 1, d) the last draft's h_l when the round accepted every draft

    def shallow(self, ids, start):
        """M^s on ids (1, T) at slots [start, start + T): the exited states h_l (1, T, d)."""
        pos = positions(None, start, ids.shape[1], ids.device)  # (1, T)
        return self.model.run_layers(self.model.embed_tokens(ids, pos), pos, range(self.l), self.cache, start)

    def deep(self, h_l, start):
        """Layers [l, L) on exited states h_l (1, T, d) at slots [start, start + T)."""
        pos = positions(None, start, h_l.shape[1], h_l.device)  # (1, T)
        return self.model.run_layers(h_l, pos, range(self.l, self.model.cfg.n_layers), self.cache, start)

    def prefill(self, h_l):
        """A reads the prompt's exited states (1, T, d) into its cache."""
        adapt(self.model, self.A, h_l, self.acache, 0)

    def draft_logits(self, h_l):
        """M^d's logits (V',) of the next token, from the exited state h_l (1, 1, d) of the newest slot."""
        if self.pending is not None:  # A catches up on the last round's last draft (module docstring)
            h_l, self.pending = torch.cat([self.pending, h_l], 1), None  # (1, 2, d)
        return self.exit_logits(h_l, self.acache, self.acache.lengths[0])[0]

    def exit_logits(self, h_l, cache, start, pad_mask=None):
        """H . A on exited states h_l (B, T, d) at A's slots [start, start + T): logits (B, V') of the last."""
        return head(self.model, adapt(self.model, self.A, h_l, cache, start, pad_mask)[:, -1], self.H)

    def pick(self, z, s: Sampling):
        """M^d's token from its logits z (V'), the confidence that the second exit compares with eta
        (the token's probability when greedy, q's top probability when sampling) and q (sampling only)."""
        if s.temperature == 0:
            j = int(z.argmax())
            return j, float(z.float().softmax(-1)[j]), None
        q = probs(z, s.temperature, s.top_p)  # (V)
        return int(torch.multinomial(q, 1, generator=s.generator)), float(q.max()), q

    def verify(self, h_l, n):
        """[SD]: M's logits (k + 1, V) at slots [n, n + k], from the exited states h_l (1, k + 1, d)."""
        return self.model.logits(self.deep(h_l, n))[0]

    def crop(self, n, a, h_l):
        """Keep x and the a accepted drafts (slots [0, n + a + 1)) in every cache; h_l (1, k + 1, d)."""
        self.cache.crop(n + a + 1)
        self.acache.crop(n + a + 1)
        self.pending = h_l[:, -1:] if a == h_l.shape[1] - 1 else None  # A has not read d_k


def draft(kg: Kangaroo, x, n, gamma, eta, s: Sampling):
    """[DD]: from x at slot n, M^s (the first exit; its keys/values stay cached) and M^d propose at
    most gamma tokens; drafting stops after a draft whose probability is below eta (the second
    exit). Returns d_1..d_k, their q (sampling) and the exited states h_l (1, k + 1, d) of x, d_1,
    ..., d_k: M^s runs on each new draft before the stop test, because its state is verified too,
    computed anyway (as in the official code)."""
    drafts, qs, hs = [], [], []
    tok, conf = x, 1.0  # conf starts at 1: the official code tests eta only from its second step
    for i in range(gamma + 1):
        hs.append(kg.shallow(torch.tensor([[tok]], device=kg.model.device), n + i))  # (1, 1, d)
        if i == gamma or conf < eta:
            break
        tok, conf, q = kg.pick(kg.draft_logits(hs[-1]), s)
        drafts.append(tok)
        qs.append(q)
    return drafts, qs, torch.cat(hs, 1)


def kangaroo_round(kg: Kangaroo, x, n, gamma, eta, s: Sampling):
    """One round from x at slot n, at most gamma drafts: draft, verify, accept, crop. Returns its
    Round and the a + 1 tokens it commits."""
    drafts, qs, h = draft(kg, x, n, gamma, eta, s)  # 1. draft k tokens: h (1, k + 1, d)
    p_logits = kg.verify(h, n)  # 2. verify: (k + 1, V), one pass
    if s.temperature == 0:  # 3. accept: the longest prefix M's greedy choice agrees with, plus M's token
        a, nxt = accept_greedy(p_logits, drafts)
    else:
        q = torch.stack(qs) if qs else None  # (k, V)
        a, nxt = accept_sampled(probs(p_logits, s.temperature, s.top_p), q, drafts, s.generator)
    kg.crop(n, a, h)  # 4. keep x and the accepted drafts; drop the rest from every cache
    return Round(len(drafts), a, drafts), drafts[:a] + [nxt]


def check_settings(cfg, prompts, adapter, l, max_new_tokens, gamma, eta, temperature, top_p, draft_vocab=None):
    """Refuse bad settings before anything is allocated; the prompts, checked (model.check_prompts)."""
    l = adapter.l if adapter is not None else l
    if l is None or not 0 < l < cfg.n_layers:
        raise ValueError(f"need an exit layer 0 < l < {cfg.n_layers} (or an adapter), got {l}")
    if not (is_int(gamma) and gamma >= 0 and isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"need an integer gamma >= 0 and 0 <= eta <= 1 (got {gamma!r}, {eta!r})")
    n_frequent = 0 if adapter is None else len(adapter.frequent)  # -1 would drop a token, 0 mean "none"
    if draft_vocab is not None and not (is_int(draft_vocab) and 1 <= draft_vocab <= n_frequent):
        raise ValueError(f"draft_vocab must be None or an integer in [1, {n_frequent}] (the adapter's frequent "
                         f"tokens), got {draft_vocab!r}")
    check_sampling(temperature, top_p)
    prompts = check_prompts(cfg, prompts)
    check_length(cfg, max(map(len, prompts)), max_new_tokens)
    return prompts


@torch.inference_mode()
def generate_kangaroo(model, prompt, adapter=None, l=None, max_new_tokens=64, gamma=6, eta=0.6,
                      draft_vocab=None, temperature=0.0, top_p=1.0, generator=None, eos=None, on_round=None,
                      observe=None):
    """Kangaroo decoding of one prompt (a list of token ids) with adapter A: the tokens and rounds.
    Ours (below the divider): adapter=None drafts with M's own final norm and head on h_l (the
    adapter-free peer; then give l); draft_vocab=K restricts the draft head to A's K most frequent
    tokens; on_round(tokens, (cache, adapter cache)) runs after each round's crop (for tests);
    observe sees each draft's and each verification's logits (for traces; see `observed`)."""
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple)):
        raise TypeError("generate_kangaroo decodes one prompt (token ids); a batch: "
                        "skip.kangaroo_batch.generate_kangaroo_batch")
    prompt, = check_settings(model.cfg, [prompt], adapter, l, max_new_tokens, gamma, eta, temperature, top_p,
                             draft_vocab)
    s, eos = Sampling(temperature, top_p, generator), check_eos(model.cfg, eos)
    kg = self_draft(model, adapter, l, draft_vocab, len(prompt) + max_new_tokens)
    kg = kg if observe is None else observed(kg, observe)

    # prefill: M on the prompt, A on its exited states
    h = kg.shallow(torch.tensor([prompt], device=model.device), 0)  # (1, T, d)
    kg.prefill(h)
    logits = model.logits(kg.deep(h, 0), last_only=True)[0, -1]  # (V,)
    tokens = [int(logits.argmax()) if temperature == 0 else
              int(torch.multinomial(probs(logits, temperature, top_p), 1, generator=generator))]
    rounds = []
    while tokens[-1] not in eos and len(tokens) < max_new_tokens:
        g = min(gamma, max_new_tokens - len(tokens) - 1)  # never draft past max_new_tokens
        rnd, new = kangaroo_round(kg, tokens[-1], len(prompt) + len(tokens) - 1, g, eta, s)
        rounds.append(rnd)
        for t in new:  # up to EOS or the budget
            tokens.append(t)
            if t in eos or len(tokens) == max_new_tokens:
                break
        if on_round is not None:
            on_round(list(tokens), (kg.cache, kg.acache))
    return KangarooOutput(tokens, rounds)


# ================================================================ ours: extensions
class TopKDraft(Kangaroo):
    """M^d's head restricted to A's K most frequent tokens, for models whose head dominates a draft
    step. Verification keeps the full head, so the output does not change; eta then applies to the
    draft's probability renormalised over those K tokens."""

    def __init__(self, model, adapter, max_len, K):  # K checked by check_settings
        super().__init__(model, adapter, max_len)
        self.vocab = adapter.frequent[:K].to(model.device)  # (K,) the token id of each row
        self.H = self.H[self.vocab].contiguous()  # (K, d), gathered once, not per step

    def pick(self, z, s):  # row j is token vocab[j]; q is spread over all V tokens, as p is
        j, conf, q = super().pick(z, s)
        if q is not None:
            q = q.new_zeros(self.model.cfg.vocab_size).index_put_((self.vocab,), q)  # (V)
        return int(self.vocab[j]), conf, q


class LensDraft(Kangaroo):
    """The adapter-free peer: M's own final norm and head read h_l (the logit lens at layer l)."""

    def __init__(self, model, l, max_len):  # no A, so no adapter cache
        self.model, self.A, self.l, self.H = model, None, l, model.head.weight
        self.cache, self.acache, self.pending = model.new_cache(1, max_len), None, None

    def prefill(self, h_l):
        pass

    def draft_logits(self, h_l):
        return self.exit_logits(h_l, None, 0)[0]

    def exit_logits(self, h_l, cache, start, pad_mask=None):  # no A: the head on h_l itself
        return self.model.logits(h_l)[:, -1]  # (B, V)

    def crop(self, n, a, h_l):
        self.cache.crop(n + a + 1)


def self_draft(model, adapter, l, draft_vocab, max_len):
    """The Kangaroo of these settings: the paper's, or one of ours."""
    if draft_vocab:
        return TopKDraft(model, adapter, max_len, draft_vocab)
    return Kangaroo(model, adapter, max_len) if adapter is not None else LensDraft(model, l, max_len)


def observed(kg, observe):
    """kg, with observe(kind, h_l, logits, ids) shown each draft ("draft": its exited state
    (1, 1, d), M^d's logits (V'), the token id of each of their rows or None for all V) and each
    verification ("verify": the k + 1 exited states (1, k + 1, d), M's logits (k + 1, V), None),
    as skip/trace/methods.py records them. Wraps this instance's two methods, nothing else."""
    draft_logits, verify, ids = kg.draft_logits, kg.verify, getattr(kg, "vocab", None)

    def draft_seen(h_l):
        z = draft_logits(h_l)  # (V')
        observe("draft", h_l, z, ids)
        return z

    def verify_seen(h_l, n):
        logits = verify(h_l, n)  # (k + 1, V)
        observe("verify", h_l, logits, None)
        return logits
    kg.draft_logits, kg.verify = draft_seen, verify_seen
    return kg
