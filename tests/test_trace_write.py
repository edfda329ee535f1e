"""`skip.trace write` from the command line as a port's check needs it: token ids without a
template (--ids), text without one (--no-chat), the stop ids (--eos, --no-eos), and Kangaroo
without an adapter (--l), each trace equal to what the Python API decodes for the same input."""
import json
import re

import pytest
import torch

from model import generate, load_model
from skip.kangaroo import generate_kangaroo
from skip.trace.__main__ import main
from tokenizer import encode_chat, load_tokenizer

from conftest import trace_cli

IDS = [5, 17, 200, 31, 9]


def written(tiny_chat_dir, out, *args):
    main(["write", "--model", str(tiny_chat_dir), "--out", str(out), *map(str, args)])
    return json.loads((out / "trace.json").read_text())


@torch.no_grad()
def test_ids_text_and_stop_ids_reach_the_decoder_as_given(tiny_chat_dir, tmp_path):
    m, tok = load_model(tiny_chat_dir), load_tokenizer(tiny_chat_dir)
    free = written(tiny_chat_dir, tmp_path / "ids", "--ids", " ".join(map(str, IDS)), "--no-eos",
                   "--max-new-tokens", 12)
    assert free["prompt"] == IDS and free["tokens"] == generate(m, [IDS], max_new_tokens=12, eos=[])[0]
    stop = free["tokens"][3]  # a stop id met on the way: the run ends at its first occurrence
    ended = written(tiny_chat_dir, tmp_path / "eos", "--ids", ",".join(map(str, IDS)), "--eos", stop,
                    "--max-new-tokens", 12)
    assert ended["tokens"] == free["tokens"][:free["tokens"].index(stop) + 1]
    plain = written(tiny_chat_dir, tmp_path / "text", "--prompt", "Name three colours.", "--no-chat", "--no-eos",
                    "--max-new-tokens", 4)
    chat = written(tiny_chat_dir, tmp_path / "chat", "--prompt", "Name three colours.", "--no-eos",
                   "--max-new-tokens", 4)
    assert plain["prompt"] == tok.encode("Name three colours.")
    assert chat["prompt"] == encode_chat(tok, "Name three colours.")


@torch.no_grad()
def test_adapter_free_kangaroo_is_written_from_the_cli_as_the_api_runs_it(tiny_chat_dir, tmp_path):
    m = load_model(tiny_chat_dir)
    meta = written(tiny_chat_dir, tmp_path / "k", "--method", "kangaroo", "--l", 2, "--ids", " ".join(map(str, IDS)),
                   "--no-eos", "--settings", '{"gamma": 3, "eta": 0.0}', "--max-new-tokens", 10)
    api = generate_kangaroo(m, IDS, None, l=2, max_new_tokens=10, gamma=3, eta=0.0, eos=[])
    assert meta["settings"] == {"adapter": None, "l": 2, "gamma": 3, "eta": 0.0, "draft_vocab": None, "policy": "row"}
    assert meta["tokens"] == api.tokens == generate(m, [IDS], max_new_tokens=10, eos=[])[0]
    assert [(s["drafted"], s["accepted"], s["drafts"]) for s in meta["steps"]] == \
        [(r.drafted, r.accepted, r.drafts) for r in api.rounds]
    assert {layer for _, layer, _ in meta["layer_runs"]} == set(range(m.cfg.n_layers))  # what show draws


@pytest.mark.parametrize("args, said", [
    (["--ids", "5 x 7"], "token ids separated"), (["--ids", "5 -1"], "none negative"),
    (["--ids", "5 99999"], "vocab"), (["--ids", "5", "--eos", "99999"], "eos"),
    (["--ids", "5", "--l", "2"], "--l is adapter-free Kangaroo's"),
    (["--ids", "5", "--method", "kangaroo", "--l", "2", "--settings", '{"adapter": "a"}'], "one of adapter and l"),
    (["--ids", "5", "--method", "kangaroo", "--l", "0"], "setting l"),
    (["--ids", "5", "--prompt", "x"], "not allowed with"), (["--ids", "5", "--eos", "2", "--no-eos"], "not allowed"),
    (["--ids", "5", "--no-chat"], "--no-chat is for --prompt"),
    (["--ids", "5", "--method", "kangaroo", "--l", "2", "--settings", '{"l": 3}'], "l is given twice")])
def test_bad_write_options_end_in_one_line_with_status_2(tiny_chat_dir, tmp_path, capsys, args, said):
    status, _, err = trace_cli(capsys, "write", "--model", tiny_chat_dir, "--out", tmp_path / "t", *args)
    assert status == 2 and said in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- compare --all and --expect
def edited(src, dst, edit):
    import shutil
    shutil.copytree(src, dst)
    meta = json.loads((dst / "trace.json").read_text())
    edit(meta)
    (dst / "trace.json").write_text(json.dumps(meta))
    return dst


def test_compare_reports_every_difference_with_all_and_notes_the_expected_ones(tiny_chat_dir, tmp_path, capsys):
    ref = tmp_path / "ref"
    written(tiny_chat_dir, ref, "--method", "kangaroo", "--l", 2, "--ids", " ".join(map(str, IDS)), "--no-eos",
            "--settings", '{"gamma": 3, "eta": 0.0}', "--max-new-tokens", 10)
    steps = json.loads((ref / "trace.json").read_text())["steps"]
    assert len(steps) >= 3

    def edit(meta):  # a peer's batch-wide cap shows in `drafted` at rounds 0 and 2; one real slip at round 1
        meta["steps"][0]["drafted"] += 1
        meta["steps"][2]["drafted"] += 1
        meta["steps"][1]["accepted"] += 1
    other = edited(ref, tmp_path / "other", edit)
    status, out, _ = trace_cli(capsys, "compare", ref, other)
    assert status == 1 and [line for line in out.splitlines() if line.startswith("step")] == \
        [f"step 0 of kangaroo differs at drafted: reference {steps[0]['drafted']}, other {steps[0]['drafted'] + 1}"]
    status, out, _ = trace_cli(capsys, "compare", ref, other, "--all")
    assert [line.split(" differs")[0] for line in out.splitlines() if line.startswith("step")] == \
        ["step 0 of kangaroo", "step 1 of kangaroo", "step 2 of kangaroo"]
    status, out, _ = trace_cli(capsys, "compare", ref, other, "--all", "--expect", "drafted")  # one key per --expect
    lines = out.splitlines()
    assert status == 1 and [line for line in lines if line.startswith("step")] == \
        [f"step 1 of kangaroo differs at accepted: reference {steps[1]['accepted']}, "
         f"other {steps[1]['accepted'] + 1}"]  # the one that was not expected
    assert sum("as expected" in line for line in lines) == 2
    status, _, err = trace_cli(capsys, "compare", ref, other, "--expect", "drafted_typo")
    assert status == 2 and "not a step key both traces record" in err


# ---------------------------------------------------------------- a port's batch folder
@torch.no_grad()
def test_a_ports_batch_folder_compares_row_by_row_with_ours(tiny_chat_dir, tmp_path, capsys):
    """transformers' rows and a hand-written port's rows (format.write), each a batch folder, against
    our batched trace: equal row by row; a port whose row 1 slips is named at row 1."""
    import transformers
    from skip.trace.batch import trace_batch, write_batch
    from skip.trace.format import prompt_pass, write
    from skip.trace.port import write_transformers_trace
    m = load_model(tiny_chat_dir)
    m.cfg.eos_token_id = []
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    prompts = [IDS, IDS[:2], [7, 8, 9, 10, 11, 12, 13]]
    trace_batch(m, prompts, tmp_path / "ours", "full", max_new_tokens=6)
    write_transformers_trace(hf, prompts, tmp_path / "hf", 6)
    assert trace_cli(capsys, "compare", tmp_path / "ours", tmp_path / "hf")[0] == 0
    tokens = generate(m, prompts, max_new_tokens=6, eos=[])
    tokens[1] = tokens[1][:3] + [(tokens[1][3] + 1) % m.cfg.vocab_size] + tokens[1][4:]
    write_batch(tmp_path / "port", "full", {}, [
        lambda folder, p=p, t=t: write(folder, m.cfg, p, t, prompt_pass(m, p)) for p, t in zip(prompts, tokens)])
    status, out, _ = trace_cli(capsys, "compare", tmp_path / "ours", tmp_path / "port")
    assert status == 1 and out.strip().splitlines()[-1].startswith("row 1: generated token 3 differs")


# ---------------------------------------------------------------- show, any valid trace alone
@torch.no_grad()
def test_a_trace_without_layer_runs_is_drawn_from_its_steps_as_ours_records_them(llama_dir, tmp_path):
    """The layer runs inferred from each method's steps are exactly the ones our decoder recorded,
    so a port's trace (which records none) is drawn as ours would be."""
    import numpy as np
    from conftest import random_adapter
    from skip.kangaroo_files import save_adapter
    from skip.trace.methods import trace
    from skip.trace.show import PNG, cells, inferred_runs, show
    m = load_model(llama_dir)
    m.cfg.eos_token_id = []
    save_adapter(random_adapter(m, 2, 0, lens_like=True), tmp_path / "adapter")
    runs = {"full": {}, "unified": {"r": 2}, "skipdecode": {"r": 2}, "adainfer": {"tau": 0.3},
            "kangaroo": {"l": 2, "gamma": 3, "eta": 0.0}, "kangaroo-adapter": {"adapter": str(tmp_path / "adapter")}}
    for name, settings in runs.items():
        trace(m, [3, 14, 15, 92], tmp_path / name, name.split("-")[0], max_new_tokens=9, settings=settings)
        meta = json.loads((tmp_path / name / "trace.json").read_text())
        port = {k: v for k, v in meta.items() if k != "layer_runs"}
        assert [(s, layer, len(n)) for s, layer, n in inferred_runs(port)] == \
            [(s, layer, len(n)) for s, layer, n in meta["layer_runs"]], name
        assert np.array_equal(cells(port).states, cells(meta).states) and cells(port).l == cells(meta).l
    from skip.trace.format import TraceError
    k = json.loads((tmp_path / "kangaroo" / "trace.json").read_text())
    a = json.loads((tmp_path / "adainfer" / "trace.json").read_text())
    del k["layer_runs"], a["layer_runs"]
    for bad, said in (({**k, "steps": [{"drafted": s["drafted"]} for s in k["steps"]]}, "lack ['accepted']"),
                      ({**a, "steps": a["steps"][:-1]}, "AdaInfer steps")):
        with pytest.raises(TraceError, match=re.escape(said)):  # refused in words, never a KeyError
            cells(bad)
    assert cells({**k, "tokens": k["tokens"][:1], "steps": []}).states.shape[1] == 1  # one token: the prompt alone
    bare = tmp_path / "port"
    (bare).mkdir()
    (bare / "trace.safetensors").write_bytes((tmp_path / "kangaroo" / "trace.safetensors").read_bytes())
    meta = json.loads((tmp_path / "kangaroo" / "trace.json").read_text())
    del meta["layer_runs"]
    (bare / "trace.json").write_text(json.dumps(meta))
    assert show(bare).read_bytes().startswith(PNG)


def test_settings_are_compared_by_meaning_not_by_spelling(tiny_chat_dir, tmp_path, capsys):
    ref = tmp_path / "ref"
    written(tiny_chat_dir, ref, "--method", "kangaroo", "--l", 2, "--ids", " ".join(map(str, IDS)), "--no-eos",
            "--settings", '{"gamma": 3, "eta": 0.0}', "--max-new-tokens", 6)
    spellings = [{"l": 2, "gamma": 3, "eta": 0.0},  # adapter, draft_vocab and policy omitted: the defaults
                 {"adapter": None, "l": 2, "gamma": 3, "eta": 0.0, "draft_vocab": None, "policy": "row"}]
    for i, settings in enumerate(spellings):
        other = edited(ref, tmp_path / f"o{i}", lambda meta: meta.update(settings=settings))
        assert trace_cli(capsys, "compare", ref, other)[0] == 0
    other = edited(ref, tmp_path / "gamma", lambda meta: meta.update(settings={"l": 2, "gamma": 4, "eta": 0.0}))
    status, out, _ = trace_cli(capsys, "compare", ref, other)
    assert status == 1 and "the runs differ" in out


# ---------------------------------------------------------------- the walkthrough: a broken batched port
def test_a_batched_port_that_lets_rows_see_their_rejected_drafts_is_found_row_by_row(llama_dir, tmp_path, capsys):
    """docs/traces.md, "Check a batched port": ours written from the command line, the port's batch
    folder by write_batch; compare names the first wrong row and step, and each row run alone
    agrees (the bug lives in how the batch masks a row's rejected slots)."""
    from model import KVCache, save_model
    from skip.kangaroo_batch import generate_kangaroo_batch
    from skip.trace.batch import write_batch
    from skip.trace.format import prompt_pass, write
    from skip.trace.methods import layer_run
    m = load_model(llama_dir)
    with torch.no_grad():  # deeper layers damped: drafts from layer 2 are often accepted, by different rows
        for b in m.blocks[1:]:
            b.attn.wo.weight.mul_(0.3)
            b.mlp.down.weight.mul_(0.3)
    save_model(m, tmp_path / "model", llama_dir)
    prompts = [[5, 6, 7, 8, 9], [9, 3, 4], [11, 12, 13, 14, 15, 16, 17]]
    common = ["write", "--model", tmp_path / "model", "--method", "kangaroo", "--l", 2, "--no-eos",
              "--settings", '{"gamma": 3, "eta": 0.0}', "--max-new-tokens", 12]
    main([str(a) for a in common + [x for p in prompts for x in ("--ids", " ".join(map(str, p)))]
          + ["--out", tmp_path / "ours"]])

    def broken_port(batch):  # keeps every row's rejected drafts visible: the cache never hides them
        runs = [[] for _ in batch]  # each row's layer runs at its own slots, as ours records them
        hide, KVCache.hide = KVCache.hide, lambda self, start, kept: None
        try:
            outs = generate_kangaroo_batch(m, batch, None, l=2, max_new_tokens=12, gamma=3, eta=0.0, eos=[],
                                           on_layer=lambda i, p, h, row: runs[row].append(layer_run(i, p, h)))
        finally:
            KVCache.hide = hide
        return [(o, r) for o, r in zip(outs, runs)]
    settings = {"l": 2, "gamma": 3, "eta": 0.0}
    steps = lambda out: [{"drafted": r.drafted, "accepted": r.accepted, "drafts": r.drafts} for r in out.rounds]  # noqa
    write_batch(tmp_path / "port", "kangaroo", settings, [
        lambda folder, p=p, o=o, r=r: write(folder, m.cfg, p, o.tokens, prompt_pass(m, p), "kangaroo", settings,
                                            steps(o), layer_runs=r)
        for p, (o, r) in zip(prompts, broken_port(prompts))])
    status, out, _ = trace_cli(capsys, "compare", tmp_path / "ours", tmp_path / "port", "--all")
    found = [line for line in out.splitlines() if line.startswith("row ")]
    assert status == 1 and {line.split(":")[0] for line in found} == {"row 0", "row 1", "row 2"}
    assert any(" step " in line and "differs at accepted" in line for line in found)
    # and the first wrong layer of each row: the first slot after its first hidden draft
    assert {line.split(":")[0] for line in found if "layer" in line and "slot" in line} == {"row 0", "row 1", "row 2"}
    for i, p in enumerate(prompts):  # alone, the port has no holes to mask: each row agrees
        main([str(a) for a in common + ["--ids", " ".join(map(str, p)), "--out", tmp_path / f"ours-{i}"]])
        ((alone, runs),) = broken_port([p])
        write(tmp_path / f"port-{i}", m.cfg, p, alone.tokens, prompt_pass(m, p), "kangaroo", settings, steps(alone),
              layer_runs=runs)
        assert trace_cli(capsys, "compare", tmp_path / f"ours-{i}", tmp_path / f"port-{i}")[0] == 0


# ---------------------------------------------------------------- a batched peer with a batch-wide draft cap
def test_a_batched_port_with_a_batch_wide_draft_cap_is_checked_round_by_round(llama_dir, tmp_path, capsys):
    """docs/traces.md: ours written with the peer's draft-length policy compares round by round with
    a port that drafts the same k in every row (here the policy restated without caches,
    tests/test_kangaroo_batch.py); ours with its own per-row policy finds the drafts differ."""
    from model import save_model
    from skip.trace.batch import write_batch
    from skip.trace.format import prompt_pass, write
    from test_kangaroo import tiny
    from test_kangaroo_batch import PROMPTS, policy_rounds
    m = tiny(llama_dir, 0.3)
    save_model(m, tmp_path / "model", llama_dir)
    capped = {"l": 2, "gamma": 3, "eta": 0.0, "policy": "batch_k"}
    tokens, rounds = policy_rounds(m, PROMPTS, 2, 10, 3, 0.0, "batch_k")
    write_batch(tmp_path / "port", "kangaroo", capped, [
        lambda folder, p=p, t=t, r=r: write(folder, m.cfg, p, t, prompt_pass(m, p), "kangaroo", capped,
                                            [{"drafted": k, "accepted": a, "drafts": d} for k, a, d in r])
        for p, t, r in zip(PROMPTS, tokens, rounds)])
    ids = [x for p in PROMPTS for x in ("--ids", " ".join(map(str, p)))]
    for policy, out in (("batch_k", "ours-capped"), ("row", "ours-row")):
        main(["write", "--model", str(tmp_path / "model"), "--method", "kangaroo", "--l", "2", "--no-eos",
              "--settings", json.dumps({"gamma": 3, "eta": 0.0, "policy": policy}), "--max-new-tokens", "10", *ids,
              "--out", str(tmp_path / out)])
    assert trace_cli(capsys, "compare", tmp_path / "ours-capped", tmp_path / "port")[0] == 0
    status, out, _ = trace_cli(capsys, "compare", tmp_path / "ours-row", tmp_path / "port", "--all")
    assert status == 1 and "the runs differ" in out and "differs at drafted" in out
