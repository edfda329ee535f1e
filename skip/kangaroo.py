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
After the divider, ours: an imported adapter's own settings, the top-K draft head, the
adapter-free peer and the hook of traces. Adapter files: skip/kangaroo_files.py; training A: skip/kangaroo_train.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn as nn

from model import KVCache, attention_mask, check_length, check_sampling, filter_logits
from model.config import ConfigError, check
from model.decoder import Attention, Norm, rope_inv_freq, rope_tables
from model.flops import AttnRun, HeadRun


class AdapterError(ValueError):
    pass


class Adapter(nn.Module):
    """A = RMSNorm -> attention -> + residual -> RMSNorm, no MLP ([SD]; official kangaroo/adapter.py),
    in M's head layout, RoPE and norm eps; own: an imported adapter's own values of some of those
    (ours, own_settings below; None for adapters trained here)."""

    def __init__(self, cfg, l, own=None):
        super().__init__()
        if cfg.embed_dim != cfg.dim or cfg.pos != "rope":
            raise AdapterError("the adapter needs a RoPE model whose head reads the hidden size (Llama)")
        if not 0 < l < cfg.n_layers:
            raise AdapterError(f"exit layer l must be in [1, {cfg.n_layers - 1}], got {l}")
        self.cfg, self.l = cfg, l
        acfg, self.own, self.inv_freq = own_settings(cfg, own)  # ours; M's config and RoPE when own is None
        self.norm_in, self.attn, self.norm_out = Norm(acfg), Attention(acfg), Norm(acfg)
        # ours: token ids by frequency in the training answers, for the top-K draft head (TopKDraft)
        self.register_buffer("frequent", torch.zeros(0, dtype=torch.long))

    @classmethod
    def from_model(cls, model, l):
        """Initialise from layer l's attention (the layer M^s would run next) and the final norm."""
        a = cls(model.cfg, l)
        a.norm_in.load_state_dict(model.blocks[l].norm1.state_dict())
        a.attn.load_state_dict(model.blocks[l].attn.state_dict())
        a.norm_out.load_state_dict(model.norm.state_dict())
        return a

    def new_cache(self, max_len):  # on the adapter's device, in its dtype
        w = self.attn.wq.weight
        return KVCache(1, 1, max_len, self.cfg.n_kv_heads, self.cfg.head_dim, w.dtype, w.device)

    def rope(self, model, pos):
        """A's (cos, sin) at positions pos (B, T): M's, unless A has frequencies of its own."""
        return model.rope(pos) if self.inv_freq is None else rope_tables(self.inv_freq.to(pos.device), pos)

    def forward(self, h, rope, cache=None, start=0, attn_mask=None, impl="sdpa"):  # (B, T, d) -> (B, T, d)
        a = self.attn(self.norm_in(h), rope, attn_mask, cache, 0, start, impl)
        return self.norm_out(h + a)  # already normalised: the head reads it directly


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
def adapt(model, A, h, cache, start):
    """A's output (1, T, d) on exited states h (1, T, d) at slots [start, start + T), reading and
    extending its cache (M's observers are told: FLOPs)."""
    T = h.shape[1]
    z = A(h, A.rope(model, torch.arange(start, start + T, device=h.device)[None]), cache, start,
          attention_mask(None, start, T, h.device), model.attn_impl)
    model.emit(AttnRun(1, T, start))
    return z


def head(model, z, H):
    """The head's rows H (V', d) on z (1, d): logits (V',) (M's observers are told: FLOPs)."""
    model.emit(HeadRun(1, 1, H.shape[0]))
    return (z @ H.T)[0]


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


@dataclass
class KangarooOutput:
    tokens: list
    rounds: list = field(default_factory=list)


class Kangaroo:
    """M split at A's exit layer l, for one decoding [SD]: M^d = H . A . M^s and M share M^s (its
    layers and their KV cache) and H; A keeps a KV cache of its own."""

    def __init__(self, model, adapter, max_len):
        self.model, self.A, self.l, self.H = model, adapter, adapter.l, model.head.weight  # H: (V, d)
        self.cache, self.acache = model.new_cache(1, max_len), adapter.new_cache(max_len)
        self.last_h = None  # the last draft's h_l, which A has not read when every draft was accepted

    def shallow(self, ids, start):
        """M^s on ids (1, T) at slots [start, start + T): the exited states h_l (1, T, d)."""
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]  # (1, T)
        return self.model.run_layers(self.model.embed_tokens(ids, pos), pos, range(self.l), self.cache, start=start)

    def deep(self, h_l, start):
        """Layers [l, L) on exited states h_l (1, T, d) at slots [start, start + T)."""
        pos = torch.arange(start, start + h_l.shape[1], device=h_l.device)[None]  # (1, T)
        return self.model.run_layers(h_l, pos, range(self.l, self.model.cfg.n_layers), self.cache, start=start)

    def prefill(self, h_l):
        """A reads the prompt's exited states (1, T, d) into its cache."""
        adapt(self.model, self.A, h_l, self.acache, 0)

    def draft_logits(self, h_l, slot):
        """M^d's logits (V,) of the token after slot, from that slot's exited state h_l (1, 1, d)."""
        if self.acache.lengths[0] < slot:  # the last round accepted every draft, so A never read the
            # last draft's state (it verified, not drafted, after it): A reads it now, with this one
            # (the official evaluation/inference_kangaroo.py fills that missing adapter KV the same way)
            h_l, slot = torch.cat([self.last_h, h_l], 1), slot - 1  # (1, 2, d)
        return head(self.model, adapt(self.model, self.A, h_l, self.acache, slot)[:, -1], self.H)

    def pick(self, z, s: Sampling):
        """M^d's token from its logits z, the confidence that the second exit compares with eta (the
        token's probability when greedy, q's top probability when sampling) and q (sampling only)."""
        if s.temperature == 0:
            j = int(z.argmax())
            return j, float(z.float().softmax(-1)[j]), None
        q = probs(z, s.temperature, s.top_p)  # (V)
        return int(torch.multinomial(q, 1, generator=s.generator)), float(q.max()), q

    def verify(self, h_l, n):
        """[SD]: M's logits (k + 1, V) at slots [n, n + k], from the exited states h_l (1, k + 1, d)."""
        return self.model.logits(self.deep(h_l, n))[0]

    def crop(self, n, last_h):
        """Forget slots >= n in every cache; last_h is the round's last exited state."""
        self.cache.crop(n)
        self.acache.crop(n)
        self.last_h = last_h


def draft(kg: Kangaroo, x, n, k, eta, s: Sampling):
    """[DD]: from x at slot n, M^s (the first exit; its keys/values stay cached) and M^d propose at
    most k tokens; drafting stops after a draft whose probability is below eta (the second exit).
    Returns d_1..d_k, their q (sampling) and the k + 1 exited states h_l of x, d_1, ..., d_k: the
    last draft is verified too, since its h_l is computed anyway (as in the official code)."""
    drafts, qs, hs, conf = [], [], [], 1.0
    for i in range(k + 1):
        hs.append(kg.shallow(torch.tensor([[x]], device=kg.model.device), n + i))  # (1, 1, d)
        if i == k or conf < eta:
            break
        x, conf, q = kg.pick(kg.draft_logits(hs[-1], n + i), s)
        drafts.append(x)
        qs.append(q)
    return drafts, qs, hs


def kangaroo_round(kg: Kangaroo, x, n, k, eta, s: Sampling):
    """One round from x at slot n: draft, verify, accept, crop. Returns the Round and the a + 1
    tokens it commits."""
    drafts, qs, hs = draft(kg, x, n, k, eta, s)  # 1. draft
    p_logits = kg.verify(torch.cat(hs, 1), n)  # 2. verify: (k + 1, V)
    if s.temperature == 0:  # 3. accept: the longest prefix M's greedy choice agrees with, plus M's token
        a, nxt = accept_greedy(p_logits, drafts)
    else:
        a, nxt = accept_sampled(probs(p_logits, s.temperature, s.top_p), torch.stack(qs) if qs else None, drafts,
                                s.generator)
    kg.crop(n + a + 1, hs[-1])  # 4. keep x and the accepted drafts; drop the rest from every cache
    return Round(len(drafts), a, drafts), drafts[:a] + [nxt]


@torch.inference_mode()
def generate_kangaroo(model, prompt, adapter=None, l=None, max_new_tokens=64, gamma=6, eta=0.6,
                      draft_vocab=None, temperature=0.0, top_p=1.0, generator=None, eos=None, on_round=None,
                      observe=None):
    """Kangaroo decoding of one prompt (a list of token ids) with adapter A: the tokens and rounds.
    Ours (below the divider): adapter=None drafts with M's own final norm and head on h_l (the
    adapter-free peer; then give l); draft_vocab=K restricts the draft head to A's K most frequent
    tokens; on_round(tokens, (cache, adapter cache)) runs after each round's crop (for tests);
    observe sees each draft's and each verification's logits (for traces; see `observed`)."""
    check_settings(model.cfg, prompt, adapter, l, max_new_tokens, gamma, eta, temperature, top_p)
    T, s = len(prompt), Sampling(temperature, top_p, generator)
    kg = self_draft(model, adapter, l, draft_vocab, T + max_new_tokens + min(gamma, max_new_tokens) + 1, observe)
    eos = set(model.cfg.eos_token_id if eos is None else eos)

    # prefill: M on the prompt, A on its exited states
    h = kg.shallow(torch.tensor([prompt], device=model.device), 0)  # (1, T, d)
    kg.prefill(h)
    logits = model.logits(kg.deep(h, 0), last_only=True)[0, -1]  # (V)
    x = int(logits.argmax()) if temperature == 0 else \
        int(torch.multinomial(probs(logits, temperature, top_p), 1, generator=generator))
    out, n = KangarooOutput([x]), T
    while len(out.tokens) < max_new_tokens and x not in eos:
        k = min(gamma, max_new_tokens - len(out.tokens) - 1)  # never draft past the end
        rnd, new = kangaroo_round(kg, x, n, k, eta, s)
        out.rounds.append(rnd)
        n += rnd.accepted + 1
        for t in new:
            out.tokens.append(t)
            if t in eos or len(out.tokens) == max_new_tokens:
                break
        x = out.tokens[-1]
        if on_round is not None:
            on_round(list(out.tokens), (kg.cache, kg.acache))
    return out


# ================================================================ ours: extensions
class TopKDraft(Kangaroo):
    """M^d's head restricted to A's K most frequent tokens, for models whose head dominates a draft
    step. Verification keeps the full head, so the output does not change; eta then applies to the
    draft's probability renormalised over those K tokens."""

    def __init__(self, model, adapter, max_len, K):
        if adapter is None or len(adapter.frequent) < K:
            raise ValueError(f"draft_vocab={K} needs an adapter with that many frequent tokens")
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
        self.cache, self.acache, self.last_h = model.new_cache(1, max_len), None, None

    def prefill(self, h_l):
        pass

    def draft_logits(self, h_l, slot):
        return self.model.logits(h_l)[0, -1]

    def crop(self, n, last_h):
        self.cache.crop(n)


def self_draft(model, adapter, l, draft_vocab, max_len, observe):
    """The Kangaroo of these settings: the paper's, or one of ours; observed when observe is given."""
    if draft_vocab:
        kg = TopKDraft(model, adapter, max_len, draft_vocab)
    else:
        kg = Kangaroo(model, adapter, max_len) if adapter is not None else LensDraft(model, l, max_len)
    return kg if observe is None else observed(kg, observe)


def observed(kg, observe):
    """kg, with observe(kind, h_l, logits, ids) shown each draft ("draft": its exited state
    (1, 1, d), M^d's logits (V'), the token id of each of their rows or None for all V) and each
    verification ("verify": the k + 1 exited states (1, k + 1, d), M's logits (k + 1, V), None),
    as skip/trace.py records them."""
    draft_logits, verify, ids = kg.draft_logits, kg.verify, getattr(kg, "vocab", None)

    def draft_seen(h_l, slot):
        z = draft_logits(h_l, slot)
        observe("draft", h_l, z, ids)
        return z

    def verify_seen(h_l, n):
        logits = verify(h_l, n)
        observe("verify", h_l, logits, None)
        return logits
    kg.draft_logits, kg.verify = draft_seen, verify_seen  # this instance only
    return kg


def check_settings(cfg, prompt, adapter, l, max_new_tokens, gamma, eta, temperature, top_p):
    """Refuse bad settings before anything is allocated."""
    l = adapter.l if adapter is not None else l
    if l is None or not 0 < l < cfg.n_layers:
        raise ValueError(f"need an exit layer 0 < l < {cfg.n_layers} (or an adapter), got {l}")
    if not (isinstance(gamma, int) and gamma >= 0 and isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"need an integer gamma >= 0 and 0 <= eta <= 1 (got {gamma!r}, {eta!r})")
    check_sampling(temperature, top_p)
    if not prompt or any(not 0 <= t < cfg.vocab_size for t in prompt):
        raise ValueError(f"prompt must be non-empty token ids in [0, {cfg.vocab_size})")
    check_length(cfg, len(prompt), max_new_tokens)


OWN = ("rope_theta", "rope_type", "norm_eps")  # M's settings an imported adapter may have its own value of


def own_settings(cfg, own):
    """(A's config, own, A's fp32 RoPE frequencies or None for M's). The official code builds A's
    RoPE with base 10000 and no scaling, whatever M's, and its norms with its own config's eps
    (weights/kangaroo_official.py records those); the frequencies are a plain attribute, as in
    the Decoder, so .to(dtype) never rounds them."""
    own = dict(own or {})
    if set(own) - set(OWN) or own.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise AdapterError(f"an adapter's own settings are some of {OWN}, got {own}")
    try:
        acfg = check(replace(cfg, **own))  # M's config with A's own values
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"bad adapter settings {own}: {e}") from None
    return acfg, own, (rope_inv_freq(acfg) if {"rope_theta", "rope_type"} & set(own) else None)
