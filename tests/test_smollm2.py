"""SmolLM2-135M-Instruct end to end: the conversion against transformers loading the same GGUF
file (its dequantized tensors), then logits, hidden states, greedy chat and beam search against
transformers running those tensors (reading the GGUF again costs transformers about 20 s)."""
import json

import pytest
import torch

from model import beam_search, generate, load_model, positions
from tokenizer import encode_chat, load_tokenizer
from weights.convert import convert

from conftest import hf_beam, same_as_hf

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
           "Explain in two sentences why the sky is blue.", "List three prime numbers larger than 100."]


@pytest.fixture
def hf(smollm2_hf):
    return smollm2_hf


@pytest.fixture
def ours(smollm2):
    return smollm2


def test_converted_tensors_and_config_equal_transformers_reading_the_gguf(smollm2_gguf, smollm2_dir, monkeypatch):
    """The other tests run transformers on our converted files, so the conversion is checked
    here whole: every tensor, and every setting transformers reads from the GGUF."""
    import functools
    import gguf
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    # transformers parses the file twice (its config, then its tensors) and builds gguf's name map
    # once per module (397 times): each done once here, for the same result in half the time
    monkeypatch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    hf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    ref = hf.state_dict()
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert len(names) == 272
        for name in names:
            assert torch.equal(f.get_tensor(name), ref[name]), name
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    theirs = {**hf.config.to_dict(), **hf.config.rope_parameters}
    ours = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}  # not read from a GGUF
    assert ours == {k: theirs.get(k) for k in ours}
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)


@torch.no_grad()
def test_logits_and_hidden_states_match_transformers(hf, ours):
    model, tok = ours
    for prompt in PROMPTS:
        ids = torch.tensor([encode_chat(tok, prompt)])
        ref = hf(ids, output_hidden_states=True)
        pos = positions(None, 0, ids.shape[1])
        outs = [model.embed_tokens(ids, pos)]
        model.run_layers(outs[0], pos, callback=lambda i, h, a, m: outs.append(h))
        for i in range(30):
            scale = ref.hidden_states[i].abs().max()
            assert (ref.hidden_states[i] - outs[i]).abs().max() <= 1e-5 * max(1.0, scale), f"layer {i}"
        assert (model.logits(outs[30]) - ref.logits).abs().max() <= 1e-4


@torch.no_grad()
def test_greedy_chat_answer_identical_to_transformers(hf, ours):
    model, tok = ours
    ids = encode_chat(tok, "Write a short story about a robot who learns to paint.")
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=2)[0, len(ids):].tolist()
    mine = generate(model, [ids], max_new_tokens=32)[0]
    assert len(ref) == 32 and mine == ref  # 32 tokens, no EOS on the way
    assert "robot" in tok.decode(mine).lower()


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_bit_identical_and_answer_identical_to_transformers(smollm2_dir, dtype):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=getattr(torch, dtype)).eval()
    model, tok = load_model(smollm2_dir, dtype), load_tokenizer(smollm2_dir)
    ids = encode_chat(tok, PROMPTS[1])
    assert torch.equal(model(torch.tensor([ids])), hf(torch.tensor([ids])).logits)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=2)[0, len(ids):]
    assert len(ref) == 8 and generate(model, [ids], max_new_tokens=8)[0] == ref.tolist()  # no EOS on the way


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("no_repeat", [0, 3])
def test_beam_search_identical_to_transformers(hf, ours, num_beams, no_repeat):
    model, tok = ours
    prompts = [encode_chat(tok, p) for p in PROMPTS[:3]]  # three lengths: left padding
    kw = dict(num_beams=num_beams, max_new_tokens=9, no_repeat_ngram_size=no_repeat)
    mine = beam_search(model, prompts, **kw)
    assert same_as_hf(mine, *hf_beam(hf, prompts, [2], **kw))
    if not no_repeat:
        assert mine[0][-1] == 2  # "... Paris." and <|im_end|>: a hypothesis that ended


def test_conversion_is_idempotent(smollm2_gguf, smollm2_dir):
    said = []
    assert convert(smollm2_gguf, smollm2_dir, log=said.append) is False
    assert "nothing to do" in said[0]

