"""No input hangs or exhausts memory: a config.json whose sizes its weights cannot back, a
chat template that loops or doubles, one very long word for the tokenizer, an official
Kangaroo .bin that inflates to gigabytes. Each is refused in one line, before the work, in a
process with a generous timeout and, where the danger is memory, an address-space limit."""
import json
import random
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import model.loader
from model import LoadError, load_model
from model.config import ConfigError, from_hf, load_config, n_params
from model.decoder import Decoder
from skip import ROOT
from tokenizer import BPETokenizer, load_tokenizer, render_chat
from skip.kangaroo_official import convert_official
from weights.kangaroo_official import KEYS, OfficialAdapterError

from conftest import OPT, VARIANTS, build_hf, random_adapter

MEMORY = 3 << 30  # bytes of address space for a child process: a bomb that got through would die here


def run_limited(code, *args, memory=MEMORY):
    """python -c code in a child with an address-space limit; (status, stdout, stderr)."""
    limit = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
    p = subprocess.run([sys.executable, "-c", limit + textwrap.dedent(code), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def with_config(src, dst, **change):
    """A model folder whose config.json is src's with change, and src's weights (linked)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **change}))
    return dst


# ---------------------------------------------------------------- config.json
@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_parameter_count_a_config_implies_is_the_built_models(name):
    kind, kw = VARIANTS[name]
    base = from_hf({**kw, "model_type": kind})
    flips = [{}, {"norm_affine": False}, {"mlp_bias": True, "attn_bias": True, "out_bias": True},
             {"tie_embeddings": not base.tie_embeddings}, {"final_norm": False}]
    for flip in flips:
        cfg = replace(base, **flip)
        with torch.device("meta"):
            built = sum(p.numel() for p in Decoder(cfg).parameters())
        assert n_params(cfg) == built, flip


BEYOND_LIMITS = [({"num_hidden_layers": 10**6}, "n_layers"), ({"head_dim": 10**9}, "head_dim"),
                 ({"vocab_size": 10**9}, "vocab_size"), ({"intermediate_size": 10**12}, "ffn_dim"),
                 ({"hidden_size": 10**7}, "dim"), ({"max_position_embeddings": 10**12}, "max_seq_len"),
                 ({"num_hidden_layers": 1000, "hidden_size": 1 << 16, "num_attention_heads": 512,
                   "head_dim": 128, "num_key_value_heads": 512}, "parameters, above")]
BEYOND_WEIGHTS = [{"num_hidden_layers": 1000}, {"head_dim": 4096}, {"vocab_size": 4_000_000},
                  {"intermediate_size": 200_000},
                  {"num_attention_heads": 64, "num_key_value_heads": 64, "head_dim": 64}]


def test_config_bombs_are_refused_in_one_line_before_any_allocation(llama_dir, tmp_path):
    cases = [(with_config(llama_dir, tmp_path / f"c{i}", **change), needle)
             for i, (change, needle) in enumerate(BEYOND_LIMITS)]
    cases += [(with_config(llama_dir, tmp_path / f"w{i}", **change), "more than twice")
              for i, change in enumerate(BEYOND_WEIGHTS)]
    status, out, err = run_limited("""
        import json, sys
        from model import load_model
        load_model(sys.argv[1])  # the folder itself loads: the limit leaves room for real work
        for path in sys.argv[2:]:
            try:
                load_model(path)
                print(json.dumps(None))
            except ValueError as e:
                print(json.dumps([type(e).__name__, str(e)]))
        """, llama_dir, *(p for p, _ in cases))
    assert status == 0, err
    for (path, needle), line in zip(cases, out.splitlines(), strict=True):
        kind, msg = json.loads(line)
        assert kind in ("ConfigError", "LoadError") and needle in msg and "\n" not in msg, (path, msg)


@pytest.mark.parametrize("change", BEYOND_WEIGHTS)
def test_a_config_beyond_its_weights_is_refused_before_the_model_is_built(llama_dir, tmp_path, monkeypatch, change):
    def never(cfg):
        raise AssertionError("built")
    monkeypatch.setattr(model.loader, "Decoder", never)
    with pytest.raises(LoadError, match=r"describes [\d,]+ parameters, more than twice the [\d,]+ its weights hold"):
        load_model(with_config(llama_dir, tmp_path / "m", **change))


def test_opt_learned_positions_are_bounded_by_the_weights(tmp_path):
    build_hf("opt", OPT).save_pretrained(tmp_path / "opt", safe_serialization=True)
    load_model(tmp_path / "opt")
    with pytest.raises(LoadError, match="more than twice"):
        load_model(with_config(tmp_path / "opt", tmp_path / "bomb", max_position_embeddings=10**7))


@pytest.mark.parametrize("change, said", [({"num_hidden_layers": 10**6}, "n_layers=1000000 is above"),
                                          ({"num_hidden_layers": 1000}, "more than twice")])
def test_the_cli_ends_a_config_bomb_with_status_2_and_one_line(tiny_chat_dir, tmp_path, change, said):
    path = with_config(tiny_chat_dir, tmp_path / "m", **change)
    status, out, err = run_limited("import runpy; runpy.run_module('model', run_name='__main__')",
                                   "generate", "--model", path, "--prompt", "hi")
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and said in err, err


def test_load_config_alone_keeps_its_absolute_limits(tmp_path):
    kw = {**VARIANTS["llama_gqa"][1], "model_type": "llama"}
    for change, needle in BEYOND_LIMITS:
        with pytest.raises(ConfigError, match=needle):
            from_hf({**kw, **change})
    from_hf({**kw, "max_position_embeddings": 10_000_000, "vocab_size": 256_000})  # real models stay inside
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "big.json").write_text(json.dumps({**kw, "pad": " " * (1 << 20)}))
    for name, needle in (("deep.json", "nests deeper than 64"), ("big.json", "bytes; at most")):
        with pytest.raises(ConfigError, match=needle):
            load_config(tmp_path / name)


# ---------------------------------------------------------------- chat templates
M = [{"role": "user", "content": "hi"}]
BOMBS = {
    "printing nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
    "silent nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "loops in a macro's buffer": "{% macro m() %}{% for i in range(99999) %}{{ 'x' * 999 }}{% endfor %}{% endmacro %}"
                                 "{{ m()|length }}",
    "recursive macro": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "recursive loop": "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
    "string times": "{{ 'x' * 10**10 }}",
    "power": "{{ 10**(10**10) }}",
    "squaring": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "doubling ~": "{% set ns = namespace(s='x') %}{% for i in range(50) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling +": "{% set ns = namespace(s='x') %}{% for i in range(50) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "doubling list": "{% set ns = namespace(s=[1]) %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s] %}{% endfor %}"
                     "{{ ns.s }}",
    "nesting": "{% set ns = namespace(s=[]) %}{% for i in range(99999) %}{% set ns.s = [ns.s] %}{% endfor %}{{ ns.s }}",
    "center filter": "{{ 'x'|center(10**10) }}",
    "center method": "{{ 'x'.center(10**10) }}",
    "format width": "{{ '%9999999999s'|format('a') }}",
    "% width": "{{ '%9999999999s' % 'a' }}",
    "{} width": "{{ '{:>9999999999}'.format('a') }}",
    "join": "{% set s = 'x' * 999999 %}{{ ([s] * 99999)|join }}",
    "indent": "{{ ('\\n' * 99999)|indent(99999) }}",
    "tojson indent": "{{ messages|tojson(indent=10**10) }}",
    "batch": "{{ [1]|batch(10**10, 'x')|list }}",
    "growing list": "{% set ns = namespace(l=[]) %}{% for i in range(99999) %}{% set ns.l = ns.l + [i] %}{% endfor %}",
    "copying": "{% set ns = namespace(s='x' * 999999) %}{% for i in range(99999) %}{% set ns.s = ns.s[1:] ~ 'y' %}"
               "{% endfor %}",
    "re-serialising": "{% set l = ['x' * 999999] %}{% for i in range(99999) %}{% set s = l|string %}{% endfor %}",
}


def test_template_bombs_are_refused_in_one_line_quickly_and_in_little_memory():
    status, out, err = run_limited("""
        import json, sys
        from tokenizer import render_chat
        from tokenizer.template import TemplateLimitError
        for t in json.loads(sys.argv[1]).values():
            try:
                render_chat(t, [{"role": "user", "content": "hi"}], source="the bomb")
                print(json.dumps(None))
            except TemplateLimitError as e:
                print(json.dumps(str(e)))
        """, json.dumps(BOMBS), memory=1 << 30)
    assert status == 0, err
    for name, line in zip(BOMBS, out.splitlines(), strict=True):
        msg = json.loads(line)
        assert msg is not None and msg.startswith("the bomb: ") and "\n" not in msg, (name, msg)


TEMPLATES = [  # what real templates use: loops, macros, namespaces, filters, methods, ~ and +
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content | trim + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ loop.index ~ '/' ~ loop.length }}"
    "{{ m.content.upper()|center(12) }}{% if loop.last %}[{{ ns.n }}]{% endif %}{% endfor %}",
    "{% macro say(m) %}{{ m.role|capitalize }}: {{ m.content|replace('a', 'A') }}{% endmacro %}"
    "{% for m in messages|reverse %}{{ say(m) }}{{ '\\n' * 2 }}{% endfor %}{{ messages|tojson(indent=2) }}",
    "{{ messages|map(attribute='content')|join(', ') }}|{{ '%-8s|%5.2f' % ('x', 3.14159) }}|{{ '{:>6}'.format('y') }}"
    "{% for b in messages|batch(2, '-') %}{{ b|length }}{% endfor %}{{ bos_token ~ eos_token }}{{ 2 ** 10 }}",
    "{% for x in [[1, [2]], [3]] recursive %}({{ x if x is number else loop(x) }}){% endfor %}"
    "{{ ('a\\nb')|indent(3, true) }}{{ messages[0].content|wordwrap(5) }}{{ [1, 2] + [3] }}{{ 'ab' * 3 }}",
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_templates_render_as_transformers_renders_them(template):
    from transformers.utils.chat_template_utils import _compile_jinja_template
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a banana, an apple"},
                {"role": "assistant", "content": "ok"}]
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    ref = _compile_jinja_template(template).render(messages=messages, add_generation_prompt=True, **tokens)
    assert render_chat(template, messages, **tokens) == ref


def test_the_limits_grow_with_the_input(smollm2_dir):
    from transformers.utils.chat_template_utils import _compile_jinja_template
    tok = load_tokenizer(smollm2_dir)
    long = [{"role": "user", "content": "word " * 600_000}]  # 3 MB: above the fixed 1 MiB part of the limit
    assert render_chat(tok.chat_template, long, **tok.chat_tokens) == \
        _compile_jinja_template(tok.chat_template).render(messages=long, add_generation_prompt=True, **tok.chat_tokens)


# ---------------------------------------------------------------- the tokenizer
def test_bpe_merges_in_the_tokenizers_librarys_order_even_for_merges_listed_out_of_order():
    from tokenizers import models
    rng = random.Random(0)
    for case in range(60):
        vocab, merges = {c: i for i, c in enumerate("abc")}, []
        while len(merges) < 12:
            a, b = rng.choice(list(vocab)), rng.choice(list(vocab))
            if (a, b) not in merges and len(a + b) <= 6:
                merges.append((a, b))
                vocab.setdefault(a + b, len(vocab))
        if case % 2:
            rng.shuffle(merges)  # merges listed before the merges that make their parts
        lib, ours = models.BPE(vocab=vocab, merges=merges), BPETokenizer(vocab, merges, [])
        for _ in range(20):
            word = "".join(rng.choice("abc") for _ in range(rng.randint(1, 40)))
            assert ours._bpe(word) == [t.id for t in lib.tokenize(word)], (merges, word)


def test_one_long_word_tokenizes_as_the_library_does_in_memory_linear_and_small(smollm2_dir):
    from tokenizers import Tokenizer
    tok = load_tokenizer(smollm2_dir)
    lib = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    rng = random.Random(1)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100_000))
    tok.encode("warm up")
    tracemalloc.start()
    try:
        ids = tok.encode(word)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids == lib.encode(word, add_special_tokens=False).ids
    assert peak < 40 * len(word), f"{peak / len(word):.0f} bytes per input byte"  # was about 270


# ---------------------------------------------------------------- official Kangaroo checkpoints
@pytest.fixture
def official(llama_dir, tmp_path):
    """(model, a folder holding an official-format .bin of a random adapter for it)."""
    m = load_model(llama_dir)
    to_official = {v: k for k, v in KEYS.items()}
    state = {to_official[k]: v for k, v in random_adapter(m, 2, 0, lens_like=False).state_dict().items()
             if k != "frequent"}
    (tmp_path / "ck").mkdir()
    torch.save(state, tmp_path / "ck" / "pytorch_model.bin")
    return m, tmp_path / "ck"


def test_an_official_bin_that_inflates_far_beyond_an_adapter_is_refused_unread(official, tmp_path, monkeypatch):
    m, ck = official
    convert_official(ck, m, 2, tmp_path / "ok")  # the real one converts
    with zipfile.ZipFile(ck / "pytorch_model.bin", "a", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("archive/data/99", "w", force_zip64=True) as f:  # 256 MiB of zeros, 260 kB on disk
            for _ in range(256):
                f.write(bytes(1 << 20))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(OfficialAdapterError, match=r"inflates to 268,[\d,]+ bytes; an adapter of this model"):
        convert_official(ck, m, 2, tmp_path / "bomb")


@pytest.mark.parametrize("name, content, said", [
    ("pytorch_model.bin", b"\0" * (3 << 20), "is 3,145,728 bytes; an adapter of this model"),
    ("pytorch_model.bin", b"\x80\x02}q\x00.", "not a zip archive"),
    ("model.safetensors", b"\0" * (3 << 20), "is 3,145,728 bytes")])
def test_an_official_file_larger_than_an_adapter_is_refused_unread(official, tmp_path, monkeypatch, name, content,
                                                                   said):
    m, ck = official
    shutil.rmtree(ck)
    ck.mkdir()
    (ck / name).write_bytes(content)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(OfficialAdapterError, match=said):
        convert_official(ck, m, 2, tmp_path / "out")


# ---------------------------------------------------------------- JSON: one bounded reader (model/jsonfile.py)
def json_readers(tmp_path, llama_dir):
    """(name, read(path)) for every reader of a JSON file a user can hand this project."""
    from skip.adainfer_files import load_classifier
    from skip.harness.tasks import from_jsonl
    from skip.kangaroo_files import load_adapter
    from skip.trace.batch import read_batch
    from skip.trace.check import read
    from tokenizer.bpe import BPETokenizer
    from tokenizer.chat import read_chat_template
    m = load_model(llama_dir)

    def in_folder(name, *others):  # the file under test named `name` in a folder beside valid others
        def run(path, call):
            d = tmp_path / f"{name}-{path.name}"
            d.mkdir(exist_ok=True)
            for o in others:
                (d / o).write_bytes(b"")
            target = d / name
            if not target.exists():
                target.symlink_to(path.resolve())
            return call(d)
        return run
    return [
        ("config", lambda p: load_config(p)),
        ("classifier", lambda p: load_classifier(p, m.cfg)),
        ("task file", lambda p: from_jsonl(p)),
        ("tokenizer", lambda p: BPETokenizer.from_tokenizer_json(p)),
        ("chat template", lambda p: in_folder("tokenizer_config.json")(p, read_chat_template)),
        ("adapter", lambda p: in_folder("adapter.json", "adapter.safetensors")(p, lambda d: load_adapter(d, m))),
        ("trace", lambda p: in_folder("trace.json", "trace.safetensors")(p, read)),
        ("batch", lambda p: in_folder("batch.json")(p, read_batch)),
    ]


def test_every_json_reader_refuses_nesting_bombs_and_endless_files(tmp_path, llama_dir):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    just_too_deep = tmp_path / "d65.json"
    just_too_deep.write_text("[" * 65 + "]" * 65)
    for name, read in json_readers(tmp_path, llama_dir):
        for path, said in [(deep, "nests deeper than 64"), (just_too_deep, "nests deeper than 64"),
                           (Path("/dev/zero"), "not a regular file|is missing")]:  # a folder reader: missing
            with pytest.raises(ValueError, match=said):
                read(path)
    from model.jsonfile import parse_json
    assert parse_json("[" * 64 + "]" * 64, "x") == eval("[" * 63 + "[]" + "]" * 63)  # 64 deep is read


def test_trace_settings_nested_too_deep_end_in_one_line(llama_dir, tmp_path, capsys):
    from conftest import trace_cli
    status, _, err = trace_cli(capsys, "write", "--model", llama_dir, "--prompt", "x", "--out", tmp_path / "t",
                               "--settings", "[" * 100_000 + "]" * 100_000)
    assert status == 2 and "--settings: nests deeper than 64" in err and not (tmp_path / "t").exists()
