"""AdaInfer: features through the logit lens, online stop decisions, FLOPs of what ran."""

import json

import pytest
import torch

from model import flops
from skip.adainfer import SVM, CRFClassifier, Threshold, labels, oracle_layer, predict, trace
from skip.adainfer_files import load_classifier, save_classifier
from skip.harness.tasks import Instance, encode, from_jsonl, load_task
from tokenizer import load_tokenizer


def prompts(model, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.cfg.vocab_size, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_final(hf, h):
    """transformers' own path to the head: Llama's norm; OPT's final_layer_norm and project_out."""
    if hasattr(hf.model, "norm"):
        return hf.model.norm(h)
    dec = hf.model.decoder
    h = h if dec.final_layer_norm is None else dec.final_layer_norm(h)
    return h if dec.project_out is None else dec.project_out(h)


@torch.no_grad()
def test_logit_lens_at_every_layer_equals_transformers(pair):
    hf, model = pair
    ids = torch.tensor([prompts(model, 1)[0]])
    ref = hf(ids, output_hidden_states=True).hidden_states
    tr = trace(model, ids[0].tolist(), answer=0)
    L = model.cfg.n_layers
    for layer in range(L):  # transformers' last hidden state is already through the final norm
        h = ref[layer + 1] if layer == L - 1 else hf_final(hf, ref[layer + 1])
        p = hf.lm_head(h)[0, -1].softmax(-1)
        assert tr.top1[layer] == int(p.argmax())
        assert tr.feats[layer, 1] == pytest.approx(float(p.max()), abs=1e-5)


@torch.no_grad()
def test_threshold_that_never_fires_is_the_full_model(method_pair):
    _, model = method_pair
    for ids in prompts(model, 4):
        pred, layer = predict(model, ids, Threshold(tau=2.0))
        logits = model(torch.tensor([ids]), last_only=True)[0, -1]
        p = logits.softmax(-1).topk(2)
        assert (pred, layer) == (int(logits.argmax()), model.cfg.n_layers - 1)
        tr = trace(model, ids, answer=pred)
        assert tr.feats[-1, 0] == pytest.approx(float(p.values[0] - p.values[1]), abs=1e-6)
        assert tr.feats[-1, 1] == pytest.approx(float(p.values[0]), abs=1e-6)


def fitted(model, rule="final"):
    traces = [trace(model, ids, answer=3) for ids in prompts(model, 16, seed=1)]
    return traces, [Threshold(0.05), SVM(("gap", "top_prob", "cos_hidden")).fit(traces, rule),
                    CRFClassifier().fit(traces, rule)]


@torch.no_grad()
def test_live_decisions_equal_decisions_on_traced_features_and_save_load(llama_dir, tmp_path):
    from model import load_model
    model = load_model(llama_dir)
    traces, classifiers = fitted(model)
    test = prompts(model, 10, seed=2)
    for clf in classifiers:
        save_classifier(clf, tmp_path / f"{clf.kind}.json", model.cfg)
        again = load_classifier(tmp_path / f"{clf.kind}.json", model.cfg)
        for ids in test:
            tr = trace(model, ids, answer=0)
            stop = clf.stop_at(iter(tr.feats.tolist()))
            layer = model.cfg.n_layers - 1 if stop is None else stop
            assert predict(model, ids, clf) == (tr.top1[layer], layer)
            assert predict(model, ids, again) == (tr.top1[layer], layer)


@torch.no_grad()
def test_flops_of_an_exit_at_layer_l_are_exactly_those_layers_and_checks(llama_dir):
    from model import load_model
    model = load_model(llama_dir)
    cfg, ids = model.cfg, [5, 6, 7, 8, 9]
    for tau in (0.0, 2.0):
        with model.recording() as runs:
            _, layer = predict(model, ids, Threshold(tau), vocab=torch.tensor([1, 2, 3]))
        n = layer + 1
        expected = flops.embed_flops(cfg, 5) + n * (flops.layer_flops(cfg, 5) + flops.head_flops(cfg, 1, vocab=3))
        assert flops.total(cfg, runs) == expected


def test_labels_and_oracle():
    from skip.adainfer import Trace
    tr = Trace(torch.zeros(5, 5), [7, 3, 3, 9, 3], answer=9)
    assert labels(tr, "gold") == [0, 0, 0, 1, 0] and labels(tr, "final") == [0, 1, 1, 0, 1]
    assert labels(tr, "settled") == [0, 0, 0, 0, 1]
    assert oracle_layer(tr) == 4
    assert oracle_layer(Trace(torch.zeros(3, 5), [1, 3, 3], 3)) == 1
    assert labels(Trace(torch.zeros(3, 5), [1, 3, 3], 3), "settled") == [0, 1, 1]
    with pytest.raises(ValueError, match="label rule 'best'"):
        labels(tr, "best")


def test_bad_inputs_raise_clearly(smollm2_dir, llama_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no instances"):
        from_jsonl(empty)
    tok = load_tokenizer(smollm2_dir)
    with pytest.raises(ValueError, match="not a single token"):
        encode(tok, Instance("Capital of France:", " Paris is lovely"))
    assert len(encode(tok, Instance("Review: great\nSentiment:", " positive", [" positive", " negative"]))[2]) == 2
    from model import load_config, load_model
    path = tmp_path / "svm.json"
    save_classifier(Threshold(0.5), path, load_config(smollm2_dir), trained_on="smollm2")
    with pytest.raises(ValueError, match="fitted for a model with"):
        load_classifier(path, load_model(llama_dir).cfg)
    # another model's classifier only on request, and then it says where it came from
    with pytest.warns(UserWarning, match="fitted on smollm2"):
        assert load_classifier(path, load_model(llama_dir).cfg, other_model=True).tau == 0.5
    with pytest.raises(ValueError, match="unknown features"):
        SVM(("gap", "entropy"))


def test_tasks_load_with_single_token_answers(smollm2_dir, data_dir):
    tok = load_tokenizer(smollm2_dir)
    for name in ("sst2", "agnews", "csqa", "mmlu", "squad", "antonym", "next_letter", "last_initial"):
        task = load_task(name, n_train=20, n_test=20)
        assert task.train and task.test and not {i.prompt for i in task.train} & {i.prompt for i in task.test}
        for inst in task.test[:20]:
            encode(tok, task.with_shots(inst, 2, seed=0))


def test_agnews_is_balanced_with_one_token_per_class(smollm2_dir, data_dir):
    from collections import Counter
    tok = load_tokenizer(smollm2_dir)
    task = load_task("agnews")
    assert Counter(i.answer for i in task.train) == {a: 300 for a in task.test[0].choices}
    assert Counter(i.answer for i in task.test) == {a: 100 for a in task.test[0].choices}
    assert all(len(tok.encode(c)) == 1 for c in task.test[0].choices)


def test_the_qa_pooled_svm_is_the_svm_fitted_on_the_qa_traces_together(llama_dir):
    from model import load_model
    from skip.adainfer import trace
    from skip.harness.eval_adainfer import cross_task, simulate
    model = load_model(llama_dir)
    tr = {name: {s: [trace(model, ids, answer=3) for ids in prompts(model, 8, seed=seed + i)]
                 for i, s in enumerate(("train", "test"))} for seed, name in ((1, "csqa"), (3, "mmlu"), (5, "sst2"))}
    store = {(name, 0, "full"): (t, [8] * 8, None, {"svm": SVM().fit(t["train"], "final")}) for name, t in tr.items()}
    # a task run in both scoring modes is transferred to in its choices mode
    choices = {s: [trace(model, ids, answer=3, vocab=torch.arange(4)) for ids in prompts(model, 8, seed=s_)]
               for s, s_ in (("train", 11), ("test", 12))}
    store[("sst2", 0, "choices")] = (choices, [8] * 8, 4, {"svm": SVM().fit(choices["train"], "final")})
    cross = cross_task(store, model.cfg, 0, ("gap", "top_prob"), "final")
    pooled = SVM().fit(tr["csqa"]["train"] + tr["mmlu"]["train"], "final")
    expected = simulate(pooled, choices["test"], [8] * 8, model.cfg, 4)
    assert cross["csqa+mmlu->sst2"] == {k: v for k, v in expected.items() if k != "exits"}
    assert {k.split("->")[0] for k in cross} == {"csqa", "mmlu", "sst2", "csqa+mmlu"}


def test_settings_whose_prompts_exceed_the_context_are_reported_not_run(tiny_chat_dir, tmp_path):
    from skip.harness.eval_adainfer import main
    f = tmp_path / "long.jsonl"
    f.write_text("".join(json.dumps({"prompt": "word " * 5000 + str(i), "answer": " A"}) + "\n" for i in range(4)))
    main(["--model", str(tiny_chat_dir), "--tasks", str(f), "--n-train", "2", "--n-test", "2", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "adainfer.json").read_text())
    assert res["results"] == [] and "exceeds the context of 4096" in res["skipped"][0]


def test_grid_traces_are_cached_by_model_content_and_inputs(llama_dir, tmp_path, monkeypatch):
    from model import load_model
    from weights.files import cache_key
    from skip.harness import eval_adainfer
    monkeypatch.setattr(eval_adainfer, "CACHE", tmp_path)
    model = load_model(llama_dir)
    enc = [(ids, 3, None) for ids in prompts(model, 4, seed=7)]
    first = eval_adainfer.traces_of(model, cache_key(llama_dir, []), enc, lambda c: None)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = eval_adainfer.traces_of(None, cache_key(llama_dir, []), enc, lambda c: None)  # no model: from the file
    assert all(torch.equal(a.feats, b.feats) and a.top1 == b.top1 and a.answer == b.answer for a, b in zip(first, again))
    eval_adainfer.traces_of(model, "another model", enc, lambda c: None)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    eval_adainfer.traces_of(model, cache_key(llama_dir, []), enc, lambda c: torch.tensor([3, 4]))  # choices
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
