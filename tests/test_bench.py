"""The harness: `make bench`'s summary (every method's point computed from its part's JSON as
stated, checked against numbers worked out by hand, naming its quality metric; --summary-only
writes the three outputs), the batched Kangaroo benchmark's measures, every result's record, and
the one runner every benchmark plugs its contenders into."""
import json

import pytest
import torch

from skip.harness import bench


def parts():
    def rule(acc, fl, wall, exit_layer=0.0):
        return {"accuracy": acc, "flops_ratio": fl, "wall_clock_ratio": wall, "avg_exit_layer": exit_layer}
    adainfer = {"args": {"tau": "0.8"}, "results": [
        {"full_accuracy": 0.8, "svm": rule(0.6, 0.5, 0.5, 4.0), "crf": rule(0.8, 1.0, 1.0, 29.0),
         "threshold": rule(0.4, 0.1, 0.2)},
        {"full_accuracy": 0.2, "svm": rule(0.2, 0.3, 0.5, 8.0), "crf": rule(0.1, 1.0, 1.0, 29.0),
         "threshold": rule(0.0, 0.1, 0.2, 2.0)},
        {"full_accuracy": 0.0, "svm": rule(0.0, 9.0, 9.0, 99.0)},  # no signal to keep: left out
    ]}
    gen = {"results": [{"rule": "svm", "check_every": 4, "head": "full", "fill": "propagate", "token_match": 0.25,
                        "avg_layers": 7.5, "flops_ratio": 0.5, "wall_clock_ratio": 0.8}]}
    tp = lambda speedup, ceiling: {"1": {"speedup": speedup, "flops_ceiling": ceiling}}  # noqa: E731
    skipping = {"rows": [{"name": "full", "r": 1, "fine_tuned": False, "agreement": 1.0, "layers_per_token": 30.0,
                          "throughput": tp(1.0, 1.0)},
                         {"name": "unified", "r": 2, "fine_tuned": True, "agreement": 0.3, "layers_per_token": 15.0,
                          "throughput": tp(1.6, 1.25)}]}
    kangaroo = {"categories": {"overall": {
        "plain": {"flops_per_token": 100.0, "speedup": 1.0, "lossless": True},
        "kangaroo": {"flops_per_token": 200.0, "speedup": 1.2, "lossless": True},
        "kangaroo-4096": {"flops_per_token": 150.0, "speedup": 1.5, "lossless": True},
        "lens": {"flops_per_token": 300.0, "speedup": 0.9, "lossless": False}}}}
    return {"adainfer": adainfer, "adainfer-gen": gen, "skipping": skipping, "kangaroo": kangaroo}


def test_summary_points_follow_their_definitions():
    pts = bench.points(parts())
    got = {(p.method, p.setting): (p.quality, p.flops_ratio, p.speedup) for p in pts}
    expect = {
        ("AdaInfer (tasks)", "SVM"): ((0.6 + 0.2) / 1.0, (0.5 + 0.3) / 2, 2 / (0.5 + 0.5)),
        ("AdaInfer (tasks)", "CRF"): (0.9, 1.0, 1.0),
        ("AdaInfer (tasks)", "gap>=0.8"): (0.4, 0.1, 5.0),
        ("AdaInfer (generation)", "svm every 4, full, propagate"): (0.25, 0.5, 1.25),
        ("unified (fine-tuned)", "2x"): (0.3, 0.8, 1.6),
        ("Kangaroo", "kangaroo"): (1.0, 2.0, 1.2),
        ("Kangaroo", "kangaroo-4096"): (1.0, 1.5, 1.5),
        ("lens draft (no adapter)", "lens"): (0.0, 3.0, 0.9),
    }
    assert got.keys() == expect.keys()
    for key, values in expect.items():
        assert got[key] == pytest.approx(values), key
    # each quality named by its metric; layers per token where the part measures them (exit layer + 1 on the tasks)
    layers = {(p.method, p.setting): (p.metric, p.layers) for p in pts}
    assert layers == {("AdaInfer (tasks)", "SVM"): (bench.ACCURACY, (5 + 9) / 2),
                      ("AdaInfer (tasks)", "CRF"): (bench.ACCURACY, 30.0),
                      ("AdaInfer (tasks)", "gap>=0.8"): (bench.ACCURACY, (1 + 3) / 2),
                      ("AdaInfer (generation)", "svm every 4, full, propagate"): (bench.TOKEN_MATCH, 7.5),
                      ("unified (fine-tuned)", "2x"): (bench.AGREEMENT, 15.0),
                      ("Kangaroo", "kangaroo"): (bench.LOSSLESS, None),
                      ("Kangaroo", "kangaroo-4096"): (bench.LOSSLESS, None),
                      ("lens draft (no adapter)", "lens"): (bench.LOSSLESS, None)}


def test_summary_only_combines_existing_parts(tmp_path):
    for name, result in parts().items():
        module, js, md, *_ = bench.PARTS[name]
        (tmp_path / js).write_text(json.dumps(result))
        (tmp_path / md).write_text(f"| table of {name} |\n")
    bench.main(["--summary-only", "--out", str(tmp_path), "--parts", "adainfer", "adainfer-gen", "skipping", "kangaroo"])
    combined = json.loads((tmp_path / "bench.json").read_text())
    assert len(combined["summary"]) == 8 and combined["parts"]["kangaroo"] == parts()["kangaroo"]
    assert combined["summary"][0] == {"method": "AdaInfer (tasks)", "setting": "SVM", "quality_metric": bench.ACCURACY,
                                      "quality_kept": 0.8, "layers_per_token": 7.0, "flops_ratio": 0.4, "speedup": 2.0}
    report = (tmp_path / "bench.md").read_text()
    assert all(f"| table of {name} |" in report for name in parts())
    assert f"| AdaInfer (tasks) | SVM | {bench.ACCURACY} | 0.800 | 7.0 | 0.40 | 2.00x |" in report
    assert f"| Kangaroo | kangaroo | {bench.LOSSLESS} | 1.000 |  | 2.00 | 1.20x |" in report
    assert (tmp_path / "summary.png").stat().st_size > 10_000


def test_summary_only_without_results_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--summary-only", "--out", str(tmp_path)])
    assert e.value.code == 2 and "error: no benchmark results" in capsys.readouterr().err


# ---------------------------------------------------------------- the batched Kangaroo benchmark's measures
def test_batch_mix_takes_the_categories_in_turn():
    from skip.harness.data import mix
    assert mix([["a1", "a2", "a3"], ["b1"], ["c1", "c2"]], 5) == ["a1", "b1", "c1", "a2", "c2"]


def test_batch_waste_against_the_caches_own_slots(llama_dir):
    """idle and hole shares of a real batched run against the batch's record: each round's n read
    off the cache (its length after the previous round's crop), K the most any row drafted."""
    from conftest import random_adapter
    from test_kangaroo import tiny
    from skip.harness.bench_kangaroo_batch import batch_rounds, waste
    from skip.kangaroo_batch import generate_kangaroo_batch
    m = tiny(llama_dir, 0.3)
    A = random_adapter(m, 2, seed=1, lens_like=True)
    prompts = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18], [20], [30, 31, 32, 33, 34]]
    after = {b: [] for b in range(len(prompts))}  # each row's cache length after each of its rounds
    outs = generate_kangaroo_batch(m, prompts, A, max_new_tokens=12, gamma=3, eta=0.0, eos=[],
                             on_round=lambda tokens, caches, row: after[row].append(caches[0].lengths[0]))
    T = max(map(len, prompts))
    holes = keys = idle = verified = 0
    for b, o in enumerate(outs):
        for j, r in enumerate(o.rounds):
            K = max(x.rounds[j].drafted for x in outs if j < len(x.rounds))
            idle, verified = idle + K - r.drafted, verified + K + 1
            holes, keys = holes + r.holes, keys + (after[b][j - 1] if j else T)
    assert holes and idle  # the run exercises both
    assert waste(prompts, outs) == {"idle": idle / verified, "holes": holes / keys}
    assert [K for K, _ in batch_rounds(outs)] == [max(x.rounds[j].drafted for x in outs if j < len(x.rounds))
                                                  for j in range(max(len(x.rounds) for x in outs))]
    assert waste([prompts[0]], generate_kangaroo_batch(m, [prompts[0]], A, max_new_tokens=12, gamma=3, eta=0.0, eos=[])) \
        == {"idle": 0.0, "holes": 0.0}


def test_the_queue_schedule_is_the_queues_own(llama_dir, monkeypatch):
    """bench_pool's schedule of a queue (which prompt's which pass runs in each batch pass) against a
    real run: Kangaroo's batch rounds counted at their verification, and every row of a scheduled
    round agreeing on its K; plain decoding's steps counted at the decoder's one-token calls."""
    from conftest import random_adapter
    from test_kangaroo import tiny
    from model import flops, generate_queue
    from skip import kangaroo_batch
    from skip.harness.bench_pool import kangaroo_passes, schedule
    m = tiny(llama_dir, 0.3)
    A = random_adapter(m, 2, seed=1, lens_like=True)
    prompts = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18], [20, 21], [30, 31, 32, 33, 34], [40, 41]]  # no prefill of 1
    stop = generate_queue(m, [prompts[1]], 1, max_new_tokens=8, eos=[])[0][2]  # rows end at different passes
    verify, calls = kangaroo_batch.Batch.verify, []
    monkeypatch.setattr(kangaroo_batch.Batch, "verify", lambda bt, *a: calls.append(1) or verify(bt, *a))
    for B in (1, 2, 3):
        calls.clear()
        outs = kangaroo_batch.generate_kangaroo_batch(m, prompts, A, max_new_tokens=8, gamma=3, eta=0.0, eos=[stop],
                                                      batch_size=B)
        passes = kangaroo_passes(outs, B)
        assert len(passes) == len(calls) and sum(n for _, n in passes) == sum(len(o.rounds) for o in outs)
        steps = []
        with m.observing(lambda run, h: steps.append(1) if isinstance(run, flops.EmbedRun) and run.n == 1 else None):
            tokens = generate_queue(m, prompts, B, max_new_tokens=8, eos=[stop])
        assert len(schedule([len(t) - 1 for t in tokens], B)) == len(steps)
    assert schedule([2, 0, 1, 3], 2) == [[(0, 0), (2, 0)], [(0, 1), (3, 0)], [(3, 1)], [(3, 2)]]


def test_every_benchmark_record_names_its_run(tmp_path, capsys):
    """publish: the result and its tables, the JSON holding the command, date and machine that made it."""
    import json
    from skip.harness.report import publish
    publish(tmp_path / "out", "b", {"speedup": 1.5}, "| a |\n|---|\n| 1 |")
    res = json.loads((tmp_path / "out" / "b.json").read_text())
    assert res["speedup"] == 1.5 and set(res["run"]) == {"command", "date", "machine", "threads", "torch"}
    assert res["run"]["machine"] and res["run"]["date"][:2] == "20" and res["run"]["threads"] >= 1
    assert (tmp_path / "out" / "b.md").read_text() == "| a |\n|---|\n| 1 |\n" and "| 1 |" in capsys.readouterr().out
    with pytest.raises(ValueError):  # JSON has no NaN
        publish(tmp_path / "out", "c", {"x": float("nan")}, "")


def test_a_single_file_result_replaces_only_a_result_of_ours(tmp_path):
    """bench_decoder --out and demo --json: a new name or a result this project wrote (its run
    first), never a config, a trace or a note that happens to sit there."""
    from model.cli import writable_file
    from skip.harness.report import RESULT, record
    ours, config = tmp_path / "ours.json", tmp_path / "config.json"
    ours.write_text(record({"x": 1}))
    config.write_text('{"model_type": "llama"}')
    assert writable_file(ours, "--out", RESULT) == ours and writable_file(tmp_path / "new.json", "--out", RESULT)
    with pytest.raises(ValueError, match="config.json exists and is not a result file"):
        writable_file(config, "--out", RESULT)


# ---------------------------------------------------------------- the runner
@torch.no_grad()
def test_compare_runs_every_contender_in_turns_on_every_batch_and_keeps_its_last_call(llama_dir):
    from model import generate, load_model
    from skip.harness.runner import Contender, compare
    m = load_model(llama_dir)
    calls = []

    def decode(name, n):
        def run(ps):
            calls.append((name, len(ps)))
            return generate(m, ps, max_new_tokens=n, eos=[])
        return run
    batches = [[[5, 6]], [[7, 8, 9], [10]]]
    got = compare([Contender("a", decode("a", 3), m), Contender("b", decode("b", 4), m)], batches, 2, warmup=1,
                  record=True)
    assert calls == [("a", 1), ("b", 1)] * 3 + [("a", 2), ("b", 2)] * 3  # turns: one warm-up round, two timed
    assert got["b"].outputs == [generate(m, ps, max_new_tokens=4, eos=[]) for ps in batches]
    with m.recording() as alone:
        generate(m, batches[1], max_new_tokens=4, eos=[])
    assert got["b"].records[1] == alone and len(got["a"].records[1]) < len(alone)  # each call's own record
    assert all(len(r.ms) == 2 and min(r.ms) > 0 for r in got.values())
    with pytest.raises(ValueError, match="timed whole"):  # a peer has no decode clock of ours
        compare([Contender("peer", decode("peer", 3))], batches, 1)
    peer = compare([Contender("peer", decode("peer", 3))], batches, 1, decode_only=False, record=True)["peer"]
    assert peer.records == [None, None] and peer.outputs == got["a"].outputs
