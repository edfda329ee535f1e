"""`compare --convention NAME` (skip/trace/convention.py): a port that records its rounds as a peer
does agrees with our trace under that peer's name, and a slip in any round, or in where the run
stops, is still found. The oracles: the official Kangaroo loop (Equationliu/Kangaroo
evaluation/inference_kangaroo.py, greedy) restated here, its rounds, stop and acceptance written
anew over the decoder's passes recomputed without caches (the draft pass itself is the adapter's),
and transformers' own self-speculative decoding (skip/peer_layerskip.py)."""
import json
import shutil

import pytest
import torch

from model import positions
from skip.kangaroo import adapt
from skip.kangaroo_files import save_adapter
from skip.peer_layerskip import layerskip_rounds
from skip.trace.compare import compare
from skip.trace.format import TraceError
from skip.trace.methods import trace
from skip.trace.port import write_transformers_trace

from conftest import random_adapter, trace_cli
from test_kangaroo import tiny
from test_peer_layerskip import tiny as tiny_pair

PROMPT = [3, 14, 15, 92, 65, 35]


@torch.no_grad()
def official_loop(m, A, prompt, N, gamma, eta, eos):
    """The official greedy loop: rounds only while more than gamma tokens are left to make; draft
    until gamma drafts or, from the second, one whose top probability is below eta; commit the
    agreeing drafts and M's next token, stopping at an EOS that M emits; per round the tokens it
    committed (accept_length)."""
    def draft_probs(seq):  # M^s, A and the head, recomputed over the whole sequence
        ids = torch.tensor([seq])
        pos = positions(None, 0, len(seq))
        h = m.run_layers(m.embed_tokens(ids, pos), pos, layers=range(A.l))
        return (adapt(m, A, h, A.new_cache(1, len(seq)), 0)[0, -1] @ m.head.weight.T).softmax(-1)
    tokens, steps = [int(m(torch.tensor([prompt]))[0, -1].argmax())], []
    while len(tokens) < N - gamma:
        seq, drafts, score = prompt + tokens, [], 1.0
        for step in range(gamma + 1):
            if step == gamma or (step > 0 and score < eta):
                break
            p = draft_probs(seq + drafts)
            drafts.append(int(p.argmax()))
            score = float(p.max())
        target = m(torch.tensor([seq + drafts]))[0, len(seq) - 1:].argmax(-1).tolist()
        i = next(i for i in range(len(drafts) + 1) if i == len(drafts) or target[i] in eos or target[i] != drafts[i])
        tokens += drafts[:i] + [target[i]]
        steps.append({"drafts": drafts, "accept_length": i + 1})
        if target[i] in eos:
            break
    return tokens, steps


def port_trace(ours, path, tokens, steps):
    """A port's trace: ours with the port's tokens and steps (the same prompt pass), no layer runs
    and no FLOPs (a port that records neither)."""
    shutil.copytree(ours, path)
    meta = json.loads((path / "trace.json").read_text())
    meta = {k: v for k, v in meta.items() if k != "layer_runs"}
    (path / "trace.json").write_text(json.dumps({**meta, "tokens": tokens, "steps": steps, "flops": None}))
    return path


@pytest.mark.parametrize("N, stop", [(17, None), (30, 5)])  # stop: the index of a token made the EOS
def test_a_port_of_the_official_loop_agrees_round_by_round(llama_dir, tmp_path, N, stop):
    m = tiny(llama_dir, 0.0)
    A = random_adapter(m, 2, 0, lens_like=True)
    save_adapter(A, tmp_path / "a")
    settings = {"adapter": str(tmp_path / "a"), "gamma": 4, "eta": 0.3}
    eos = []
    if stop is not None:  # an EOS inside a round that accepted drafts past it
        trace(m, PROMPT, tmp_path / "free", "kangaroo", N, settings)
        eos = [json.loads((tmp_path / "free" / "trace.json").read_text())["tokens"][stop]]
    m.cfg.eos_token_id = eos
    ours = tmp_path / "ours"
    trace(m, PROMPT, ours, "kangaroo", N, settings)
    tokens, steps = official_loop(m, A, PROMPT, N, 4, 0.3, set(eos))
    port = port_trace(ours, tmp_path / "port", tokens, steps)
    notes = []
    assert compare(ours, port, convention="official", eos=eos, notes=notes) == []
    mine = json.loads((ours / "trace.json").read_text())
    if stop is None:  # the official loop ended early; ours made all N
        assert len(tokens) < len(mine["tokens"]) == N and any(n.startswith("official: its loop starts") for n in notes)
    else:  # the EOS ended the last round before the drafts M agreed with
        assert tokens[-1] == eos[0] and len(tokens) < N
        assert steps[-1]["accept_length"] < mine["steps"][-1]["accepted"] + 1, (steps[-1], mine["steps"][-1])
    assert any(s["accept_length"] > 1 for s in steps)  # rounds accepted drafts
    slipped = [dict(s) for s in steps]
    slipped[1]["accept_length"] += 1
    found = compare(ours, port_trace(ours, tmp_path / "slipped", tokens, slipped), convention="official", eos=eos)
    assert found == ["step 1 of kangaroo differs at accept_length: reference "
                     f"{steps[1]['accept_length']}, other {steps[1]['accept_length'] + 1}"]
    if stop is None:  # a port that ignores the official stop and makes all N tokens, round for round as ours
        runs_on = [{"drafts": s["drafts"], "accept_length": s["accepted"] + 1} for s in mine["steps"]]
        found = compare(ours, port_trace(ours, tmp_path / "runs-on", mine["tokens"], runs_on), convention="official",
                        eos=eos)
        assert f"{N} tokens, reference {len(tokens)}" in found


# (l, gamma, EOS): rule 2, the EOS 2 drafted and rejected with drafts after it; rule 3, 22 as the EOS
# drafted last and accepted (test_peer_layerskip.py)
@pytest.mark.parametrize("l, gamma, eos, rule", [(2, 6, 2, 2), (3, 3, 22, 3)])
def test_a_port_of_transformers_self_speculation_agrees_with_its_eos_rules(tmp_path_factory, tmp_path, capsys, l,
                                                                          gamma, eos, rule):
    hf, m = tiny_pair("llama_gqa", tmp_path_factory)
    prompt, N, settings = [11, 3, 40, 7], 24, {"l": l, "gamma": gamma, "eta": 0.0}
    m.cfg.eos_token_id = [eos]
    ours = tmp_path / "ours"
    trace(m, prompt, ours, "kangaroo", N, settings)
    first = json.loads((ours / "trace.json").read_text())["tokens"][:1]
    peer = layerskip_rounds(hf, prompt + first, l, gamma, 0.0, N - 1, eos=[eos])  # rule 1: fed our first token
    steps = [{"drafted": r.drafted, "accepted": r.accepted, "drafts": r.drafts} for r in peer.rounds]
    write_transformers_trace(hf, prompt, tmp_path / "port", method="kangaroo", settings=settings,
                             tokens=first + peer.tokens, steps=steps)
    port = tmp_path / "port"
    assert compare(ours, port, convention="transformers", eos=[eos]) == []
    mine = json.loads((ours / "trace.json").read_text())["steps"]
    if rule == 2:  # ours drafted past the EOS, transformers did not
        assert any(eos in s["drafts"][:-1] for s in mine)
        assert any("differs at drafted" in f for f in compare(ours, port))
    else:  # ours counts an accepted EOS draft, transformers does not
        assert any(eos in s["drafts"][:s["accepted"]] for s in mine)
        assert any("differs at accepted" in f for f in compare(ours, port))
    notes = []
    assert compare(ours, port, convention="transformers", notes=notes)  # no EOS ids: rules 2 and 3 not applied
    assert any("no --eos ids given" in n for n in notes)
    status, out, _ = trace_cli(capsys, "compare", ours, port, "--convention", "transformers", "--eos", eos)
    assert status == 0 and out.strip().endswith("the traces agree within the tolerances")


def test_a_convention_is_refused_where_it_maps_nothing(llama_dir, tmp_path, capsys):
    m = tiny(llama_dir, 0.0)
    full = tmp_path / "full"
    trace(m, PROMPT, full, "full", 4)
    with pytest.raises(TraceError, match="maps Kangaroo's rounds, not full's"):
        compare(full, full, convention="official")
    status, _, err = trace_cli(capsys, "compare", full, full, "--convention", "nobody")
    assert status == 2 and "invalid choice: 'nobody'" in err
