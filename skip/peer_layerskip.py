"""transformers' self-speculative decoding (LayerSkip's method, `generate(assistant_early_exit=l)`)
recorded round by round, to check it against this project's adapter-free Kangaroo (skip/kangaroo.py
with adapter=None), which is the same algorithm:

    from skip.peer_layerskip import layerskip_rounds
    out = layerskip_rounds(hf, prompt, l=4, gamma=3, eta=0.4, max_new_tokens=24)
    out.tokens, [(r.drafted, r.accepted, r.drafts) for r in out.rounds]   # KangarooOutput, Round

transformers (5.x, generation/candidate_generator.py `EarlyExitCandidateGenerator`) drafts with
layers [0, l) of the model and its own final norm and head, by calling `generate` on the model
with `config.num_hidden_layers = l`; a round stops drafting after `num_assistant_tokens` drafts or
after a draft whose probability is below `assistant_confidence_threshold` (ConfidenceCriteria,
checked after the draft is appended, so that draft is verified too), and the full model verifies
(generation/utils.py `_assisted_decoding`). A round is recorded where the decoding loop hands it
over: the candidates from `get_candidates` and the accepted count from `update_candidate_strategy`.
How it differs from Kangaroo, and by how much on the test prompts: docs/traces.md, "Peers checked
round by round". This module imports no transformers (a test-only dependency): the caller
passes the model.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from model.config import is_int, is_real

from .kangaroo import KangarooOutput, Round


@contextmanager
def drafter_settings(hf, gamma, eta):
    """The drafter reads num_assistant_tokens and assistant_confidence_threshold from the model's
    own generation_config (AssistedCandidateGenerator.__init__ deep-copies
    `assistant_model.generation_config`), not from generate's arguments: set them there for the
    call, with the constant schedule (the heuristic one changes gamma every round)."""
    if not (is_int(gamma) and gamma >= 0 and is_real(eta) and 0 <= eta <= 1):
        raise ValueError(f"need an integer gamma >= 0 and 0 <= eta <= 1 (got {gamma!r}, {eta!r})")
    cfg = hf.generation_config
    keys = ("num_assistant_tokens", "assistant_confidence_threshold", "num_assistant_tokens_schedule")
    old = {k: getattr(cfg, k) for k in keys}
    for k, v in zip(keys, (gamma, eta, "constant")):
        setattr(cfg, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(cfg, k, v)


@contextmanager
def recording(hf, rounds):
    """Appends a Round to `rounds` for every verification of the next assisted generate on hf:
    wraps the candidate generator that `_get_candidate_generator` builds (an attribute on this
    instance only; transformers' code is untouched)."""
    build = hf._get_candidate_generator

    def wrapped(*args, **kwargs):
        gen = build(*args, **kwargs)
        get, update = gen.get_candidates, gen.update_candidate_strategy

        def get_candidates(input_ids, *a, **kw):
            cand, logits = get(input_ids, *a, **kw)  # (1, n + k): the committed tokens, then k drafts
            rounds.append(Round(cand.shape[1] - input_ids.shape[1], None, cand[0, input_ids.shape[1]:].tolist()))
            return cand, logits

        def update_candidate_strategy(input_ids, scores, num_matches):
            # num_matches: the accepted drafts, already cut after an EOS or at max_length
            rounds[-1].accepted = int(num_matches)
            return update(input_ids, scores, num_matches)
        gen.get_candidates, gen.update_candidate_strategy = get_candidates, update_candidate_strategy
        return gen
    hf._get_candidate_generator = wrapped
    try:
        yield rounds
    finally:
        del hf._get_candidate_generator  # the class's method again


@torch.inference_mode()
def layerskip_rounds(hf, prompt, l, gamma, eta, max_new_tokens, eos=None):
    """transformers' greedy self-speculative decoding of one prompt (token ids) with exit layer l,
    at most gamma drafts a round and confidence threshold eta: its new tokens and its rounds
    (drafted k, accepted a, drafts d_1..d_k). eos: the stop ids (default: the model's own)."""
    x = torch.tensor([prompt], device=hf.device)  # (1, T)
    kw = {} if eos is None else {"eos_token_id": list(eos)}
    rounds = []
    with drafter_settings(hf, gamma, eta), recording(hf, rounds):
        seq = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                          assistant_early_exit=l, **kw)
    return KangarooOutput(seq[0, len(prompt):].tolist(), rounds)


def transformers_round(drafts, accepted, eos):
    """One round of ours as transformers records it, (drafted, accepted, drafts), by its two rules
    that differ (docs/traces.md): its drafter stops after a draft that is an EOS id (an
    EosTokenCriteria in the drafter's generate; Kangaroo drafts on), and its accepted count stops
    before an accepted EOS (the accepted tokens are cut after the first EOS, then n_matches = what
    is left - 1)."""
    j = next((i for i, t in enumerate(drafts) if t in eos), None)
    return (len(drafts), accepted, drafts) if j is None else (j + 1, min(accepted, j), drafts[:j + 1])


def as_transformers(rounds, eos):
    """Our rounds as transformers records them (transformers_round)."""
    return [Round(*transformers_round(r.drafts, r.accepted, eos)) for r in rounds]
