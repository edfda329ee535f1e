"""Generation with the KV cache: greedy or sampled (temperature, top-k, top-p), or beam search,
batched with left padding, stopping per row at EOS or after max_new_tokens."""
from __future__ import annotations

import math

import torch

from .config import is_int, is_real


def filter_logits(logits, top_k=0, top_p=1.0):
    """Mask to -inf all but the top_k tokens, then all but the smallest set whose
    probability reaches top_p (the most likely token always stays). logits (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before the token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def left_pad(prompts, pad_id, device="cpu"):
    """list of id lists -> ids (B, T), mask (B, T) with True on real tokens, or None when no
    prompt is shorter than T (the decoder then runs as for one prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], device=device)
    if all(len(p) == T for p in prompts):
        return ids, None
    return ids, torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)


# ---------------------------------------------------------------- checks at the boundary of every decoder
# generate, beam search, the exits, AdaInfer and Kangaroo take their prompts and settings through
# these, so that no sibling accepts what another refuses: TypeError or ValueError naming the argument.
def check_prompts(cfg, prompts, what="prompt"):
    """A list of prompts, each a non-empty list of token ids in [0, vocab): a copy as lists."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{what}s must be a list of token-id lists, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"no {what}s: need at least one list of token ids")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, (list, tuple)):
            raise TypeError(f"{what} {i} must be a list of token ids, got {type(p).__name__}")
        if not p:
            raise ValueError(f"{what} {i} holds no token ids: every {what} needs at least one token")
        bad = [t for t in p if not is_int(t)]
        if bad:
            raise TypeError(f"{what} {i} holds {bad[0]!r:.40}, not an integer token id")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
        out.append(list(p))
    return out


def check_eos(cfg, eos):
    """The ids that end a row: the model's (None) or a list of token ids in the vocabulary."""
    if eos is None:
        return set(cfg.eos_token_id)
    if isinstance(eos, (str, bytes, int)) or not isinstance(eos, (list, tuple, set, frozenset)):
        raise TypeError(f"eos must be a list of token ids (or None for the model's), got {eos!r:.40}")
    if not all(is_int(t) and 0 <= t < cfg.vocab_size for t in eos):
        raise ValueError(f"eos must hold token ids in [0, {cfg.vocab_size}), got {list(eos)[:5]!r:.60}")
    return set(eos)


def check_sampling(temperature, top_p, top_k=0):
    """NaN fails every comparison, so the test is written as 'not (all good)'."""
    if not (is_real(temperature) and is_real(top_p) and is_int(top_k)
            and 0 <= temperature < math.inf and 0 < top_p <= 1 and top_k >= 0):
        raise ValueError(f"need finite temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                         f"(got {temperature!r}, {top_p!r}, {top_k!r})")


def check_length(cfg, prompt_len, max_new_tokens):
    """Before anything is allocated: the prompt and the new tokens must fit the model's context."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"{prompt_len} prompt tokens + {max_new_tokens} new tokens exceed the model's context "
                         f"of {cfg.max_seq_len} positions")


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0,
             generator=None, eos=None, on_token=None, decode_layers=None):
    """prompts: list of token-id lists. Returns the new tokens of each prompt (EOS included).
    on_token(step, tokens (B,)) is called after each step, e.g. to stream text.
    decode_layers(i) -> the layers that generated token i (i = 0, 1, ...) runs through when it
    is fed back (default: all); the prompt always runs through all layers."""
    cfg = model.cfg
    prompts, eos = check_prompts(cfg, prompts), check_eos(cfg, eos)
    check_sampling(temperature, top_p, top_k)
    ids, mask = left_pad(prompts, cfg.pad_token_id or 0, model.device)
    B, T = ids.shape
    check_length(cfg, T, max_new_tokens)
    cache = model.new_cache(B, T + max_new_tokens)  # and the home of the padding (model/cache.py)

    logits = model(ids, cache=cache, pad_mask=cache.open(T, mask), last_only=True)
    out = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        tok = next_token(logits[:, -1].float(), temperature, top_k, top_p, generator)  # (B,)
        for b, t in enumerate(tok.tolist()):  # the step's one copy to the host
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos
        if on_token is not None:
            on_token(step, tok)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(tok[:, None], cache=cache, start=T + step, pad_mask=cache.open(1), last_only=True,
                       layers=None if decode_layers is None else decode_layers(step))
    return out


def ban_repeated_ngrams(seqs, logp, n):
    """-inf for every token that would complete an n-gram already in its row (seqs (N, S), the
    prompt and its left padding included, as transformers' no_repeat_ngram_size counts)."""
    if seqs.shape[1] < n:
        return logp
    windows = seqs.unfold(1, n, 1)  # (N, S - n + 1, n)
    prefix = seqs[:, seqs.shape[1] - n + 1:]  # (N, n - 1): what the next token would extend
    match = (windows[..., :-1] == prefix[:, None]).all(-1)  # (N, S - n + 1)
    banned = torch.zeros_like(logp, dtype=torch.bool)  # (N, V)
    rows = torch.arange(seqs.shape[0], device=seqs.device)[:, None].expand_as(match)
    banned[rows[match], windows[..., -1][match]] = True
    return logp.masked_fill(banned, float("-inf"))


@torch.inference_mode()
def beam_search(model, prompts, num_beams=4, max_new_tokens=32, length_penalty=1.0, no_repeat_ngram_size=0,
                early_stopping=False, eos=None, decode_layers=None):
    """Beam search as transformers' generate(num_beams=K) does it, so its outputs are identical:
    per prompt K running beams; each step keeps the best max(2, 1 + n_eos) * K continuations of
    all beams by summed log-probability; a continuation among the first K that ends in EOS (or
    reaches max_new_tokens) joins the prompt's K best finished hypotheses, scored
    sum log p / n_new ** length_penalty; the best K that did not end run on. A prompt is done when
    K hypotheses are finished and the best running beam, at its current length, cannot beat the
    worst of them (early_stopping=False; True: as soon as K are finished; "never": with a
    positive length_penalty, at max_new_tokens). Returns each prompt's best hypothesis (new tokens).
    decode_layers as in generate()."""
    cfg, K = model.cfg, num_beams
    if not (isinstance(K, int) and K >= 1 and isinstance(no_repeat_ngram_size, int) and no_repeat_ngram_size >= 0
            and -math.inf < length_penalty < math.inf and early_stopping in (True, False, "never")):
        raise ValueError(f"need num_beams >= 1, no_repeat_ngram_size >= 0, a finite length_penalty and "
                         f"early_stopping True, False or 'never' (got {K}, {no_repeat_ngram_size}, "
                         f"{length_penalty}, {early_stopping!r})")
    prompts, eos = check_prompts(cfg, prompts), sorted(check_eos(cfg, eos))
    ids, mask = left_pad(prompts, cfg.pad_token_id or 0, model.device)
    B, T = ids.shape
    check_length(cfg, T, max_new_tokens)
    cache = model.new_cache(B, T + max_new_tokens)  # and the home of the padding (model/cache.py)

    logits = model(ids, cache=cache, pad_mask=cache.open(T, mask), last_only=True)[:, -1]  # (B, V)
    cache.reorder(torch.arange(B, device=ids.device).repeat_interleave(K))  # every beam starts from its prompt's cache
    logits, seqs = logits.repeat_interleave(K, 0), ids.repeat_interleave(K, 0)  # (B*K, V), (B*K, T)
    scores = torch.zeros(B, K, device=ids.device)  # summed log-probabilities of the running beams
    scores[:, 1:] = -1e9  # the K copies of a prompt are one beam until the first step
    finished = [[] for _ in range(B)]  # per prompt: (score, new tokens), at most K, best first
    done = [False] * B  # no running beam can beat the finished ones any more
    n_keep, eos_t = max(2, 1 + len(eos)) * K, torch.tensor(eos, dtype=torch.long, device=ids.device)
    for step in range(max_new_tokens):
        logp = logits.float().log_softmax(-1)  # (B*K, V)
        if no_repeat_ngram_size:
            logp = ban_repeated_ngrams(seqs, logp, no_repeat_ngram_size)
        V = logp.shape[-1]
        top, idx = (logp.view(B, K, V) + scores[:, :, None]).view(B, K * V).topk(n_keep)  # (B, n_keep)
        beam, tok = idx // V, idx % V  # (B, n_keep)
        ends = torch.isin(tok, eos_t) | (step == max_new_tokens - 1)  # (B, n_keep)
        normed = top / (step + 1) ** length_penalty  # (B, n_keep)
        firsts = (ends[:, :K], beam[:, :K], tok[:, :K], normed[:, :K])  # what may finish: one copy to the host
        for b, (e, bm, t, sc) in enumerate(zip(*(x.tolist() for x in firsts))):
            if done[b] or (early_stopping is True and len(finished[b]) == K):
                continue
            for j in range(K):
                if e[j]:
                    finished[b].append((sc[j], seqs[b * K + bm[j], T:].tolist() + [t[j]]))
            finished[b] = sorted(finished[b], key=lambda f: -f[0])[:K]
        top = top + ends * -1e9  # an ended continuation does not run on
        scores, keep = top.topk(K)  # (B, K)
        rows = (beam.gather(1, keep) + torch.arange(B, device=ids.device)[:, None] * K).view(-1)  # (B*K,)
        toks = tok.gather(1, keep).view(-1)  # (B*K,)
        seqs = torch.cat([seqs[rows], toks[:, None]], 1)  # (B*K, T + step + 1)
        n_best = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step + 1
        for b, best_running in enumerate((scores[:, 0] / n_best ** length_penalty).tolist()):
            done[b] |= len(finished[b]) == K and not best_running > finished[b][-1][0]
        if all(done) or bool(ends.all()) or (early_stopping is True and all(len(f) == K for f in finished)):
            break
        cache.reorder(rows)
        logits = model(toks[:, None], cache=cache, start=T + step, pad_mask=cache.open(1), last_only=True,
                       layers=None if decode_layers is None else decode_layers(step))[:, -1]
    return [f[0][1] for f in finished]
