"""The from-scratch BPE against transformers' tokenizer built from the same GGUF, and against
the `tokenizers` library reading the tokenizer.json our converter writes."""
import json
import warnings

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokenizer import BPETokenizer, SentencePieceTokenizer, chatml, encode_chat, load_tokenizer

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


# ---------------------------------------------------------------- Llama 2 and Llama 3 tokenizers
def training_texts():
    """Tokenizers are trained on training splits (GSM8K train, AlpacaEval) and checked on others."""
    if not DATA.exists():
        pytest.skip(f"benchmark data not found at {DATA}")
    gsm = [json.loads(line)["question"] for line in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    alpaca = [json.loads(line)["instruction"] for line in (DATA / "alpaca" / "alpaca_eval.jsonl").read_text().splitlines()]
    return gsm[:3000] + alpaca


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
                   "message['content'] | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                   "{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """A Llama-3-style tokenizer.json trained here by the tokenizers library: Llama 3's Split regex,
    ByteLevel without its own regex, BPE with ignore_merges, <|begin_of_text|> added in front."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from tokenizer.bpe import LLAMA3_REGEX
    d = tmp_path_factory.mktemp("llama3")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.train_from_iterator(training_texts(), trainers.BpeTrainer(
        vocab_size=3000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return d


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    """A Llama-2-style tokenizer.model trained here by the sentencepiece trainer with Llama 2's
    settings: BPE, byte fallback, split digits, identity normalizer, dummy prefix, <s> = 1, </s> = 2."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("llama2")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()), model_prefix=str(d / "tokenizer"), vocab_size=2000,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA2_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return d


def test_llama3_style_ids_equal_transformers_and_the_tokenizers_library(llama3_dir):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    ours = load_tokenizer(llama3_dir)
    assert ours.pattern == "llama3" and ours.ignore_merges and ours.prefix == [0]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(llama3_dir / "tokenizer.json"))
    lib = Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    texts = benchmark_texts() + ["x = 12345\n\n 42 apples", "It's  DON'T\r\n\r\n  \tyes", "<|eot_id|>tail é中 ſ"]
    mismatched = [t for t in texts if not ours.encode(t) == hf.encode(t) == lib.encode(t).ids]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} differ, first: {mismatched[0]!r}"
    assert all(ours.decode(ours.encode(t, add_special_tokens=False)) == t for t in texts)


def test_llama2_style_ids_equal_transformers(llama2_dir):
    from transformers import LlamaTokenizer
    ours = load_tokenizer(llama2_dir)
    assert isinstance(ours, SentencePieceTokenizer)
    hf = LlamaTokenizer.from_pretrained(llama2_dir, add_bos_token=True)
    texts = benchmark_texts() + ["Ünïcode ✓ 42 \U0001F600", "tabs\tand\nnewlines"]
    mismatched = [t for t in texts if ours.encode(t) != hf.encode(t)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} differ, first: {mismatched[0]!r}"
    assert ours.encode("hi")[0] == 1 and ours.encode("hi", add_special_tokens=False)[0] != 1
    assert ours.decode(ours.encode("Ünïcode ✓ \U0001F600")) == "Ünïcode ✓ \U0001F600"  # byte fallback


@pytest.mark.parametrize("which", ["llama3", "llama2", "smollm2"])
def test_chat_prompts_render_the_shipped_template_as_transformers(which, llama3_dir, llama2_dir, smollm2_dir):
    from transformers import AutoTokenizer
    d = {"llama3": llama3_dir, "llama2": llama2_dir, "smollm2": smollm2_dir}[which]
    ours = load_tokenizer(d)
    from transformers import LlamaTokenizer
    hf = LlamaTokenizer.from_pretrained(d, add_bos_token=True) if which == "llama2" else AutoTokenizer.from_pretrained(d)
    hf.chat_template = ours.chat_template
    for message in ("Hi!", "  Name three colours.\n"):
        ref = hf.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
        assert encode_chat(ours, message) == list(ref)
