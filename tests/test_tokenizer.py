"""The from-scratch BPE against transformers' tokenizer built from the same GGUF, and against
the `tokenizers` library reading the tokenizer.json our converter writes."""
import json
import warnings

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokenizer import BPETokenizer, SentencePieceTokenizer, chatml, load_tokenizer

from skip import DATA


def benchmark_texts():
    if not DATA.exists():
        pytest.skip(f"benchmark data not found at {DATA}")
    lines = (DATA / "sst2" / "dev.tsv").read_text().splitlines()[1:]
    sst2 = [line.rsplit("\t", 1)[0] for line in lines]
    spec = [t for line in (DATA / "specbench" / "question.jsonl").read_text().splitlines()
            for t in json.loads(line)["turns"]]
    assert len(sst2) == 872 and len(spec) > 480
    return sst2 + spec


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return BPETokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def from_json(smollm2_dir):
    return BPETokenizer.from_tokenizer_json(smollm2_dir / "tokenizer.json"), \
        __import__("tokenizers").Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


def test_ids_equal_transformers_on_sst2_and_specbench(ours, hf_tok):
    texts = benchmark_texts()
    mismatched = [t for t in texts if ours.encode(t) != hf_tok.encode(t, add_special_tokens=False)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} differ, first: {mismatched[0]!r}"
    assert all(ours.decode(ours.encode(t)) == t for t in texts)


def test_tokenizer_json_equals_the_tokenizers_library(from_json):
    ours, lib = from_json
    texts = benchmark_texts() + ["x = 12345\n\n 42 apples", "<|im_start|>user\n3+4?<|im_end|>"]
    mismatched = [t for t in texts if ours.encode(t) != lib.encode(t, add_special_tokens=False).ids]
    assert not mismatched, f"{len(mismatched)} differ, first: {mismatched[0]!r}"
    assert ours.split_digits  # SmolLM2's own pre-tokenizer: every digit alone


text_strategy = st.text(st.characters(exclude_categories=("Cs", "Cn", "Co")), max_size=60) | \
    st.lists(st.sampled_from([" ", "\n", "  ", "\t", "'s", "'ll", "1", "23", " 4", "é", "中", "a", "Bc", "!?",
                              "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\u00a0", "\u3000", "\x1c"]),
             max_size=20).map("".join)


@pytest.mark.filterwarnings("ignore:byte")  # dropped bytes are announced; the test below checks that
@settings(max_examples=300, deadline=None, derandomize=True)  # the same 300 texts in every run
@given(text_strategy)
@example('"\x16:')  # found by a random run: 0x16 has no token, and '"' ':' then merge
def test_random_unicode_matches_and_round_trips(ours, hf_tok, from_json, text):
    ids = ours.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    if all(ours.byte_char[b] in ours.vocab for b in text.encode()):
        assert ours.decode(ids) == text
    else:  # a byte the vocabulary lacks is dropped, exactly as the tokenizers library does
        assert ours.decode(ids) == ours.decode(hf_tok.encode(text, add_special_tokens=False))
    mine, lib = from_json
    assert mine.encode(text) == lib.encode(text, add_special_tokens=False).ids


def test_a_dropped_byte_is_announced_once_and_a_lone_surrogate_is_refused(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)  # a fresh one: nothing announced yet
    with pytest.warns(UserWarning, match=r"byte\(s\) 0x16 of .* have no token in this vocabulary and are dropped"):
        assert tok.encode('"\x16:') == tok.encode('":')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode("a\x16b")  # announced already
    with pytest.raises(ValueError, match="lone surrogate U\\+DC80 at index 2"):
        tok.encode("ab\udc80")


def test_special_tokens_stay_whole(ours):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ours.decode(ids[:1]) == "<|im_start|>"


def test_chat_format_equals_the_gguf_chat_template(hf_tok, smollm2_dir):
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    for messages in ([{"role": "user", "content": "Hi!"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]):
        ref = hf_tok.apply_chat_template(messages, chat_template=cfg["chat_template"], tokenize=False,
                                         add_generation_prompt=True)
        assert chatml(messages) == ref
    assert isinstance(load_tokenizer(smollm2_dir), BPETokenizer)


def test_sentencepiece_tokenizer_for_llama2_style_files(tmp_path):
    import sentencepiece as spm
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, 12 apples", "layers skip early exit"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=320, byte_fallback=True, model_type="bpe")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in ("hello lazy fox", "Ünïcode ✓ 42"):
        ids = tok.encode(text)
        assert ids == [ref.bos_id()] + ref.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids[1:]).decode().lstrip(" ") == text
