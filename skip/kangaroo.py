"""Kangaroo: lossless self-speculative decoding via double early exiting
(Liu et al. 2024, arXiv 2404.18911; official code github.com/Equationliu/Kangaroo).

Notation (paper Sec. 3):
    M        the full model, layers [0, L); M^s = layers [0, l), the shallow sub-network
    A        the adapter: RMSNorm -> attention (M's head layout, RoPE) -> + residual -> RMSNorm
    H        M's frozen LM head; the draft model is M^d = H . A . M^s        (layer early exit)
    gamma    at most gamma draft steps per round
    eta      drafting stops after a draft whose top probability is below eta (draft early exit)
    p, q     target (M) and draft (M^d) distributions of the next token

One round, starting from the last committed token x (its slot n is not cached yet):
  1. draft: run M^s on x, A, H -> d_1; M^s on d_1, A, H -> d_2; ... (Sec. 3.2). M^s keeps its
     keys/values, and the exited hidden states h_l of x, d_1, ..., d_k are kept too.
  2. verify: layers [l, L) run once on those k+1 hidden states (M^s is never recomputed);
     the longest prefix of drafts that M agrees with is accepted, plus M's own next token.
  3. every cache (shallow, deep, adapter) is cropped to the accepted length.
Greedy rounds accept d_i while d_i = argmax p_i, so the output equals plain greedy decoding.
Sampled rounds use the speculative sampling rule (Leviathan et al. 2023, Alg. 1; Chen et al.
2023): accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), else draw from
norm(max(0, p_i - q_i)), which keeps every token distributed exactly as p.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import KVCache, attention_mask, check_length, check_sampling, filter_logits
from model.decoder import Attention, Norm
from model.files import atomic_dir
from model.flops import AttnRun, HeadRun


class AdapterError(ValueError):
    pass


class Adapter(nn.Module):
    """A = RMSNorm -> attention -> + residual -> RMSNorm, no MLP (Sec. 3.1, Fig. 2)."""

    def __init__(self, cfg, l):
        super().__init__()
        if cfg.embed_dim != cfg.dim or cfg.pos != "rope":
            raise AdapterError("the adapter needs a RoPE model whose head reads the hidden size (Llama)")
        if not 0 < l < cfg.n_layers:
            raise AdapterError(f"exit layer l must be in [1, {cfg.n_layers - 1}], got {l}")
        self.cfg, self.l = cfg, l
        self.norm_in, self.attn, self.norm_out = Norm(cfg), Attention(cfg), Norm(cfg)
        # token ids by frequency in the training text, for the cheaper draft head (extension)
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

    def forward(self, h, rope, cache=None, start=0, mask=None, impl="sdpa"):  # (B, T, d) -> (B, T, d)
        a = self.attn(self.norm_in(h), rope, mask, cache, 0, start, impl)
        return self.norm_out(h + a)  # already normalised: the head reads it directly


# ---------------------------------------------------------------- save / load
def save_adapter(adapter, path, force=False, **info):
    """adapter.safetensors + adapter.json (settings and training record, written last) in
    directory path, atomically; a folder that is not an adapter is refused unless force."""
    meta = {"l": adapter.l, "dim": adapter.cfg.dim, "n_heads": adapter.cfg.n_heads,
            "n_kv_heads": adapter.cfg.n_kv_heads, "vocab_size": adapter.cfg.vocab_size, **info}
    with atomic_dir(path, "adapter.json", force) as tmp:
        save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(tmp / "adapter.safetensors"))
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_adapter(path, model):
    """Load an adapter saved by save_adapter for this model; any mismatch raises AdapterError."""
    path = Path(path)
    for name in ("adapter.json", "adapter.safetensors"):
        if not (path / name).is_file():
            raise AdapterError(f"no adapter in {path}: {name} is missing (train one: make kangaroo)")
    try:
        meta = json.loads((path / "adapter.json").read_text())
        tensors = load_file(str(path / "adapter.safetensors"))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise AdapterError(f"adapter in {path} is corrupted: {e}") from e
    cfg = model.cfg
    want = {"dim": cfg.dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size}
    wrong = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if wrong:
        raise AdapterError(f"adapter in {path} was trained for another model: "
                           + ", ".join(f"{k} {a} (model: {b})" for k, (a, b) in wrong.items()))
    adapter = Adapter(cfg, meta["l"])
    adapter.frequent = tensors.get("frequent", adapter.frequent)
    own = adapter.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [f"{k} {tuple(tensors[k].shape)} (want {tuple(own[k].shape)})"
              for k in set(own) & set(tensors) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise AdapterError(f"adapter in {path} does not fit: missing {missing}, unexpected {unexpected}, "
                           f"mis-shaped {shapes}")
    adapter.load_state_dict(tensors)
    return adapter.to(model.device, model.dtype).eval()  # dtype casts the weights, not the ids in `frequent`


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


# ---------------------------------------------------------------- decoding
@dataclass
class Round:
    drafted: int  # k: draft tokens proposed
    accepted: int  # a: how many of them M accepted (the round yields a + 1 tokens)
    drafts: list = field(default_factory=list)  # d_1..d_k


@dataclass
class KangarooOutput:
    tokens: list
    rounds: list = field(default_factory=list)


@dataclass
class Drafter:
    """The draft model M^d = H . A . M^s of one decoding, with its sampling settings."""
    model: nn.Module
    adapter: Adapter | None  # None: M's own final norm and head read h_l (the adapter-free peer)
    l: int
    W: torch.Tensor  # (V', d) the draft head's rows: H, or its top-K rows (extension)
    vocab: torch.Tensor | None  # (V',) token id of each row of W when it is a top-K head
    vocab_ids: list[int] | None  # the same ids on the host, read per draft without a device sync
    temperature: float
    top_p: float
    generator: torch.Generator | None
    observe: Callable | None = None  # sees every draft and verification distribution (for traces)


@dataclass
class State:
    """What a round hands the next: slots [0, n) are cached in every layer of M."""
    cache: KVCache  # M's keys/values
    acache: KVCache | None  # A's: slots [0, n), or [0, n - 1) after a fully accepted round
    n: int  # the slot of x
    x: int  # the last committed token (its slot is not cached yet)
    last_h: torch.Tensor | None = None  # h_l at slot n - 1, which A has not read after a fully accepted round


def draft_logits(d: Drafter, st: State, h_l, slot):
    """M^d on M^s's output h_l (1, 1, d) at slot: logits (V',) of the token after it."""
    model = d.model
    if d.adapter is None:
        return model.logits(h_l)[0, -1]
    if st.acache.lengths[0] < slot:  # every draft was accepted: A reads the last one now, with this one
        h_l, slot = torch.cat([st.last_h, h_l], 1), slot - 1  # (1, 2, d)
    t = h_l.shape[1]
    z = d.adapter(h_l, model.rope(torch.arange(slot, slot + t, device=h_l.device)[None]), st.acache, slot,
                  attention_mask(None, slot, t, h_l.device), model.attn_impl)[:, -1]  # (1, d)
    if model.runs is not None:
        model.runs += [AttnRun(1, t, slot), HeadRun(1, 1, d.W.shape[0])]
    return (z @ d.W.T)[0]


def draft(d: Drafter, st: State, budget, eta):
    """Sec. 3.2: from x, M^s (first early exit, at layer l; its keys/values stay cached) and M^d
    propose at most `budget` tokens; drafting stops after a draft whose top probability is below
    eta (second early exit). Returns the drafts d_1..d_k, their draft distributions q (sampling
    only) and the k + 1 exited states h_l of x, d_1, ..., d_k: the last draft is verified too,
    since its h_l is computed anyway (as in the official code)."""
    model, drafts, qs, hs, tok, conf = d.model, [], [], [], st.x, 1.0
    for step in range(budget + 1):
        slot = st.n + step
        pos = torch.tensor([[slot]], device=model.device)
        x = torch.tensor([[tok]], device=model.device)
        h_l = model.run_layers(model.embed_tokens(x, pos), pos, range(d.l), st.cache, start=slot)
        hs.append(h_l)
        if step == budget or conf < eta:
            break
        z = draft_logits(d, st, h_l, slot)  # (V')
        if d.observe is not None:
            d.observe("draft", h_l, z, d.vocab)
        if d.temperature == 0:
            j = int(z.argmax())
            conf = float(z.float().softmax(-1)[j])
        else:
            qv = probs(z, d.temperature, d.top_p)  # (V')
            j = int(torch.multinomial(qv, 1, generator=d.generator))
            conf = float(qv.max())
            qs.append(qv if d.vocab is None else qv.new_zeros(model.cfg.vocab_size).index_put_((d.vocab,), qv))
        tok = j if d.vocab is None else d.vocab_ids[j]
        drafts.append(tok)
    return drafts, qs, hs


def verify(d: Drafter, st: State, hs):
    """Layers [l, L) once on the k + 1 exited states (M^s never runs twice on a slot): M's logits (k + 1, V)."""
    model = d.model
    pos = torch.arange(st.n, st.n + len(hs), device=hs[0].device)[None]  # (1, k + 1)
    h_l = torch.cat(hs, 1)  # (1, k + 1, d)
    logits = model.logits(model.run_layers(h_l, pos, range(d.l, model.cfg.n_layers), st.cache, start=st.n))[0]
    if d.observe is not None:
        d.observe("verify", h_l, logits, None)
    return logits


def kangaroo_round(d: Drafter, st: State, budget, eta):
    """One round: draft, verify, accept, crop. Returns the Round and the a + 1 tokens it commits."""
    drafts, qs, hs = draft(d, st, budget, eta)  # 1. draft
    p_logits = verify(d, st, hs)  # 2. verify
    if d.temperature == 0:  # the longest prefix that M's greedy choice agrees with, plus M's token
        a, nxt = accept_greedy(p_logits, drafts)
    else:
        a, nxt = accept_sampled(probs(p_logits, d.temperature, d.top_p), torch.stack(qs) if qs else None,
                                drafts, d.generator)
    st.n += a + 1  # 3. keep x and the accepted drafts; drop the rest from every cache
    st.cache.crop(st.n)
    if st.acache is not None:
        st.acache.crop(st.n)
    st.last_h = hs[-1]
    return Round(len(drafts), a, drafts), drafts[:a] + [nxt]


@torch.inference_mode()
def generate_kangaroo(model, prompt, adapter=None, l=None, max_new_tokens=64, gamma=6, eta=0.6,
                      draft_vocab=None, temperature=0.0, top_p=1.0, generator=None, eos=None, on_round=None,
                      observe=None):
    """Kangaroo decoding of one prompt (a list of token ids).

    adapter=None drafts with M's own final norm and head on h_l (self-speculation without an
    adapter, the peer baseline; then give l). draft_vocab=K restricts the draft head to the
    adapter's K most frequent tokens (the extension for models whose head dominates a draft
    step); verification always uses the full head, so the output does not change (eta then
    applies to the draft's probability renormalised over those K tokens).
    on_round(tokens, caches) is called after each round's crop (for tests); observe(kind, h_l,
    logits, ids) sees each draft ("draft": its exited state (1, 1, d), the draft head's logits (V'),
    the token id of each of their rows or None for all V) and each verification ("verify": the
    k + 1 exited states (1, k + 1, d), M's logits (k + 1, V), None), as skip/trace.py records them."""
    cfg, L = model.cfg, model.cfg.n_layers
    l = adapter.l if adapter is not None else l
    if l is None or not 0 < l < L:
        raise ValueError(f"need an exit layer 0 < l < {L} (or an adapter), got {l}")
    if not (isinstance(gamma, int) and gamma >= 0 and isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"need an integer gamma >= 0 and 0 <= eta <= 1 (got {gamma!r}, {eta!r})")
    check_sampling(temperature, top_p)
    if not prompt or any(not 0 <= t < cfg.vocab_size for t in prompt):
        raise ValueError(f"prompt must be non-empty token ids in [0, {cfg.vocab_size})")
    check_length(cfg, len(prompt), max_new_tokens)
    vocab, W = None, model.head.weight  # (V, d)
    if draft_vocab:
        if adapter is None or len(adapter.frequent) < draft_vocab:
            raise ValueError(f"draft_vocab={draft_vocab} needs an adapter with that many frequent tokens")
        vocab = adapter.frequent[:draft_vocab].to(model.device)
        W = W[vocab].contiguous()  # (K, d), gathered once, not per step
    d = Drafter(model, adapter, l, W, vocab, None if vocab is None else vocab.tolist(), temperature, top_p, generator,
                observe)
    eos = set(cfg.eos_token_id if eos is None else eos)
    T = len(prompt)
    max_len = T + max_new_tokens + min(gamma, max_new_tokens) + 1  # a round never drafts past the end
    cache = model.new_cache(1, max_len)
    acache = adapter.new_cache(max_len) if adapter is not None else None

    # prefill: M on the prompt; A on the prompt's h_l fills the adapter cache
    pos = torch.arange(T, device=model.device)[None]
    h = model.run_layers(model.embed_tokens(torch.tensor([prompt], device=model.device), pos), pos, range(l), cache)
    if adapter is not None:
        adapter(h, model.rope(pos), acache, 0, None, model.attn_impl)
        if model.runs is not None:
            model.runs.append(AttnRun(1, T, 0))
    logits = model.logits(model.run_layers(h, pos, range(l, L), cache), last_only=True)[0, -1]
    x = int(logits.argmax()) if temperature == 0 else \
        int(torch.multinomial(probs(logits, temperature, top_p), 1, generator=generator))
    st, out = State(cache, acache, T, x), KangarooOutput([x])
    while len(out.tokens) < max_new_tokens and st.x not in eos:
        budget = min(gamma, max_new_tokens - len(out.tokens) - 1)  # never draft past the end
        rnd, new = kangaroo_round(d, st, budget, eta)
        out.rounds.append(rnd)
        for t in new:
            out.tokens.append(t)
            if t in eos or len(out.tokens) == max_new_tokens:
                break
        st.x = out.tokens[-1]
        if on_round is not None:
            on_round(list(out.tokens), (st.cache, st.acache))
    return out
