"""`make demo`'s entry point on a tiny model with SmolLM2's vocabulary: what it prints is what the
methods compute. AdaInfer's answers and stop layers (read from one traced pass per prompt) are
those of a live skip.adainfer.predict, and so is its accuracy; Kangaroo's tokens are plain
greedy's; each Unified row's tokens are generate_unified's with the same weights."""
import math

import torch

from model import generate, load_model
from skip.adainfer import predict
from skip.harness import demo
from skip.harness.data import specbench
from skip.harness.tasks import encode, load_task
from skip.train.lora import attach, load_lora, save_lora
from skip.unified import generate_unified, kept_layers
from tokenizer import encode_chat, load_tokenizer
from conftest import random_adapter


def test_demo_rows_are_what_the_methods_compute(tiny_chat_dir, data_dir, tmp_path):
    from skip.kangaroo_files import save_adapter
    model, tok = load_model(tiny_chat_dir), load_tokenizer(tiny_chat_dir)
    save_adapter(random_adapter(model, 2, 0, lens_like=True), tmp_path / "kangaroo", force=True)
    lora = attach(load_model(tiny_chat_dir), kept_layers(model.cfg.n_layers, 2), rank=2)
    with torch.no_grad():
        for m in lora.values():
            m.B.normal_(0, 0.5)  # a fine-tune that changes the answers
    save_lora(lora, tmp_path / "lora", model, steps=0)
    n_test = 8
    out = demo.main(["--model", str(tiny_chat_dir), "--tasks", "sst2", "--n-train", "8", "--n-test", str(n_test),
                     "--time-n", "1", "--prompts", "1", "--max-new", "6", "--runs", "1",
                     "--adapter", str(tmp_path / "kangaroo"), "--lora", str(tmp_path / "lora")])

    ada, = out["adainfer"]
    task = load_task("sst2", 8, n_test)
    enc = [encode(tok, inst) for inst in task.test]
    for label, clf in ada["classifiers"].items():
        row = next(r for r in ada["rows"] if r["rule"] == label)
        live = [predict(model, ids, clf, torch.tensor(ch)) for ids, _, ch in enc]
        assert row["accuracy"] == sum(p == ans for (p, _), (_, ans, _) in zip(live, enc)) / n_test
        assert row["layers_per_prompt"] == sum(layer + 1 for _, layer in live) / n_test
        for ex, (pred, layer) in zip(ada["examples"], live):
            assert (ex[label]["answer_id"], ex[label]["stop_layer"]) == (pred, layer)
    assert ada["rows"][0]["rule"] == "full model" and ada["rows"][0]["layers_per_prompt"] == model.cfg.n_layers

    rows = {r["method"]: r for r in out["generation"]["rows"]}
    ids = encode_chat(tok, specbench(*demo.GEN_PROMPTS[0][:1], demo.GEN_PROMPTS[0][1] + 1)[-1][0])
    greedy = generate(model, [ids], max_new_tokens=6)[0]
    kangaroo = next(m for m in rows if m.startswith("Kangaroo"))
    assert rows["full model"]["tokens"] == greedy and rows[kangaroo]["tokens"] == greedy  # lossless
    assert rows[demo.UNTUNED]["tokens"] == generate_unified(model, [ids], 2, max_new_tokens=6)[0]
    tuned = load_model(tiny_chat_dir)
    load_lora(tmp_path / "lora", tuned)
    lora_row = next(m for m in rows if "low-rank" in m)
    assert rows[lora_row]["tokens"] == generate_unified(tuned, [ids], 2, max_new_tokens=6)[0]
    assert rows[lora_row]["tokens"] != rows[demo.UNTUNED]["tokens"]  # the fine-tune was used
    for s in out["generation"]["summary"]:
        assert all(math.isfinite(s[k]) for k in ("layers_per_token", "flops_ratio", "wall_clock_ratio", "agreement"))
    full = out["generation"]["summary"][0]
    assert full["method"] == "full model" and full["layers_per_token"] == model.cfg.n_layers
    assert full["flops_ratio"] == full["wall_clock_ratio"] == 1.0
