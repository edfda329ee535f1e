"""Peers' round conventions, as named mappings: `compare --convention NAME` rewrites our Kangaroo
trace (the reference) as that peer records the same run, then compares as usual, so a port that
follows a peer's convention is checked round by round, not only token by token.

  official      Equationliu/Kangaroo, evaluation/inference_kangaroo.py (greedy). It records per
                round `accept_length`, the tokens the round committed: accepted drafts + 1, fewer
                where the full model emits an EOS (the official verification stops there, where
                ours counts every agreeing draft and cuts the output after); its list's leading 1
                is the prefill's token, not a round. A port records it as the step key
                `accept_length`. Its loop starts a round only while more than gamma tokens are
                left to make (`start_index < max_infer_steps - 1 - SPECULATIVE_DECODING_STEPS`,
                start_index the newest token's slot, max_infer_steps the prompt's length plus
                max_new_tokens N), so it can stop up to gamma tokens short of N, where ours drafts
                at most what is left and makes all N: ours is cut before its first round that
                starts with at most gamma tokens left. N is ours' token count unless ours ended on
                an EOS, which the EOS ids (`--eos`) tell; then every round is kept, as the
                official run also ends on it. The drafting and its two exits are ours already.
  transformers  `generate(assistant_early_exit=l)`, skip/peer_layerskip.py, rules 1-3 of
                docs/traces.md: run it on the prompt plus our first token (it has no prefill
                token), and write its trace with our first token in front of its tokens; given
                the EOS ids (`--eos`), a round's drafts stop after its first EOS draft and
                `accepted` stops before an accepted EOS (as_transformers).

Each mapping takes (ours, notes, eos): our trace.json as read (settings with their defaults), the
list that compare's notes go to, and the EOS ids or None; it returns ours rewritten.
"""
from __future__ import annotations

from ..peer_layerskip import transformers_round
from .format import TraceError

# a Kangaroo step's lists: one entry per draft, or per verified position (x and the drafts)
PER_DRAFT = ("drafts", "draft_top_ids", "draft_top_probs")
PER_VERIFIED = ("exited_norms", "verify_top_ids", "verify_top_probs")


def official(ours, notes, eos):
    tokens, made, steps = ours["tokens"], 1, []  # the prefill makes token 0
    for st in ours["steps"]:
        n = min(st["accepted"] + 1, len(tokens) - made)  # fewer where an EOS ended the output
        steps.append({**st, "accept_length": n})
        made += n
    if eos is None:
        notes.append("official: no --eos ids given, so ours is taken to have made all max_new_tokens")
    elif tokens and tokens[-1] in eos:
        return {**ours, "steps": steps}  # ended on an EOS: the official run ends in the same round
    N, gamma = len(tokens), ours["settings"].get("gamma")
    if gamma is None:
        raise TraceError(f"the official convention needs the reference's gamma; its settings: {ours['settings']}")
    made, kept = 1, []
    for st in steps:
        if made >= N - gamma:  # the official loop starts no round with at most gamma tokens left
            break
        kept.append(st)
        made += st["accept_length"]
    if len(kept) < len(steps):
        notes.append(f"official: its loop starts no round with at most gamma ({gamma}) tokens left: ours compared "
                     f"on its first {len(kept)} rounds and {made} tokens, of {len(steps)} and {N}")
    return {**ours, "tokens": tokens[:made], "steps": kept}


def transformers(ours, notes, eos):
    if not eos:
        notes.append("transformers: no --eos ids given, so rules 2 and 3 (an EOS draft) are not applied")
        return ours
    steps = []
    for st in ours["steps"]:
        drafted, accepted, _ = transformers_round(st["drafts"], st["accepted"], eos)
        cut = {k: st[k][:drafted] for k in PER_DRAFT if k in st}
        cut.update({k: st[k][:drafted + 1] for k in PER_VERIFIED if k in st})
        steps.append({**st, **cut, "drafted": drafted, "accepted": accepted})
    return {**ours, "steps": steps}


CONVENTIONS = {"official": official, "transformers": transformers}


def apply(name, ours, notes, eos=None):
    """Our trace `ours` as the peer `name` records it (CONVENTIONS)."""
    if name not in CONVENTIONS:
        raise TraceError(f"unknown convention {name!r} ({', '.join(CONVENTIONS)})")
    if ours["method"] != "kangaroo":
        raise TraceError(f"the {name} convention maps Kangaroo's rounds, not {ours['method']}'s")
    return CONVENTIONS[name](ours, notes, None if eos is None else set(eos))
