"""Oracles of the golden tests: tiny random transformers models saved as safetensors, and the
real SmolLM2-135M-Instruct GGUF (fetched and converted by `make weights`); the cache-free
decoding reference and random Kangaroo adapters that several test files share."""

import os

import pytest
import torch

from model import left_pad, load_model
from skip import DATA
from skip.kangaroo_adapter import Adapter
from skip.layerwise import layerwise_forward, prompt_then

transformers = pytest.importorskip("transformers")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    torch.set_num_threads(1)

SMALL = dict(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)
LLAMA = dict(SMALL, intermediate_size=96, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
OPT = dict(SMALL, ffn_dim=96, bos_token_id=2, eos_token_id=2, pad_token_id=1)

VARIANTS = {
    "llama_gqa": ("llama", dict(LLAMA, num_key_value_heads=2)),
    "llama_tied": ("llama", dict(LLAMA, tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(LLAMA, num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "llama_rope_linear": ("llama", dict(LLAMA, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama_rope_llama3": ("llama", dict(LLAMA, num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "qwen2": ("qwen2", dict(LLAMA, num_key_value_heads=2, tie_word_embeddings=True)),
    # windows shorter than the tests' prompts, so that they matter: Qwen3 on its layers 2 and 3
    "qwen3_window": ("qwen3", dict(LLAMA, num_key_value_heads=2, head_dim=24, attention_bias=True,
                                   use_sliding_window=True, sliding_window=5, max_window_layers=2)),
    "mistral_window": ("mistral", dict(LLAMA, num_key_value_heads=1, sliding_window=6)),
    "opt_pre": ("opt", dict(OPT, do_layer_norm_before=True)),
    "opt_post_proj": ("opt", dict(OPT, do_layer_norm_before=False, word_embed_proj_dim=32)),
}


FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "opt": "OPT"}


def build_hf(kind, kw, seed=0):
    torch.manual_seed(seed)
    name = FAMILIES[kind]
    hf = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**kw))
    # Larger than the default 0.02 init so every layer changes the output visibly.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.normal_(1.0 if is_norm_weight else 0.0, 0.15 if p.dim() > 1 else 0.1)
    return hf.eval()


def hf_generate(hf, prompts, eos, **kw):
    """transformers' greedy decoding or beam search (num_beams) on left-padded prompts: the new
    tokens of each row. eos None: the model's own EOS ids."""
    pad, T = hf.config.pad_token_id, max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=pad, **kw)
    return [row[T:].tolist() for row in out]


def hf_beam(hf, prompts, eos, **kw):
    """hf_generate's rows and the fill after a finished hypothesis (the pad id, or EOS when the
    pad id is 0)."""
    return hf_generate(hf, prompts, eos, **kw), hf.config.pad_token_id or eos[0]


def same_as_hf(ours, ref, fill):
    return len(ours) == len(ref) and all(r[:len(o)] == o and set(r[len(o):]) <= {fill} for o, r in zip(ours, ref))


def reference_decode(model, prompts, layer_sets_for, n_new):
    """Greedy decoding without any cache: recompute the whole sequence for every token, token i
    running the layers layer_sets_for(i)."""
    outs = [[] for _ in prompts]
    for _ in range(n_new):
        seqs = [p + o for p, o in zip(prompts, outs)]
        ids, mask = left_pad(seqs, 0, model.device)
        T_prompt = ids.shape[1] - len(outs[0])
        runs = prompt_then(model.cfg.n_layers, T_prompt, [layer_sets_for(i) for i in range(len(outs[0]))])
        nxt = layerwise_forward(model, ids, runs, mask)[:, -1].argmax(-1)
        for o, t in zip(outs, nxt.tolist()):
            o.append(t)
    return outs


def chi_square_pvalue(counts, exact, N, tv=0.15, power=0.99, alpha=0.01):
    """The chi-square p-value of counts (V,) of N draws against the exact distribution (V,), on
    the bins expected >= 5 and the rest pooled. First it checks that N is large enough: the test
    must reject, with probability >= power at level alpha, any distribution at total variation >=
    tv from exact over those bins; sum (r - e)^2 / e >= (sum |r - e|)^2 = 4 tv^2 (Cauchy-Schwarz,
    sum e = 1), so the noncentrality is at least 4 N tv^2 whatever the alternative. Sampling
    tests are sized by this power, not by habit."""
    from scipy.stats import chi2, chisquare, ncx2
    big = exact * N >= 5
    pooled = [] if exact[~big].sum() == 0 else [~big]
    obs = torch.stack([*counts[big], *(counts[m].sum() for m in pooled)])
    exp = torch.stack([*exact[big], *(exact[m].sum() for m in pooled)]) * N
    df = len(obs) - 1
    assert ncx2.sf(chi2.ppf(1 - alpha, df), df, 4 * N * tv ** 2) >= power, f"{N} draws are too few for this test"
    return chisquare(obs.numpy(), exp.numpy()).pvalue


def random_adapter(model, l, seed, lens_like):
    """A random Kangaroo adapter over layer l; lens_like: A = the final norm, so its drafts are
    as good as the logit lens."""
    torch.manual_seed(seed)
    a = Adapter(model.cfg, l)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.15 if p.dim() > 1 else 0.1)
        if lens_like:
            a.attn.wo.weight.zero_()
            a.norm_out.load_state_dict(model.norm.state_dict())
    a.frequent = torch.randperm(model.cfg.vocab_size)
    return a.eval()


def build_pair(name, tmp_path_factory):
    kind, kw = VARIANTS[name]
    hf = build_hf(kind, kw)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, load_model(path)


@pytest.fixture(scope="session", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its safetensors directory): every variant, for
    tests whose subject is the decoder."""
    return build_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="session", params=["llama_gqa", "opt_post_proj"])
def method_pair(request, tmp_path_factory):
    """pair for tests whose subject is a method built on the decoder: one model of each
    architecture (the post-norm OPT with its projections the farthest from Llama)."""
    return build_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf(*VARIANTS["llama_gqa"]).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama (4 layers, d=16) with SmolLM2's vocabulary, tokenizer and chat template:
    the command-line tools run on it in a moment, in every dtype."""
    import shutil
    path = tmp_path_factory.mktemp("tiny_chat")
    kw = dict(LLAMA, vocab_size=49152, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=32, max_position_embeddings=4096, eos_token_id=2, pad_token_id=2,
              tie_word_embeddings=True)
    build_hf("llama", kw).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def data_dir():
    """The benchmark data beside the project (../shared/data); tests that read it skip without it."""
    if not DATA.exists():
        pytest.skip(f"benchmark data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def smollm2_gguf():
    from weights.__main__ import smollm2_gguf
    from weights.convert import ConvertError
    try:
        return smollm2_gguf()
    except ConvertError as e:
        pytest.fail(f"{e}")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    from weights import DEFAULT_MODEL
    from weights.convert import convert
    convert(smollm2_gguf, DEFAULT_MODEL, log=lambda *a: None)  # a no-op when `make weights` already ran
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(our SmolLM2-135M-Instruct in fp32, its tokenizer), loaded once: tests only read them."""
    from tokenizer import load_tokenizer
    return load_model(smollm2_dir), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    """transformers' SmolLM2-135M-Instruct in fp32 from the same files, loaded once."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def refused(main, argv, capsys):
    """main(argv), run in this process, ends with status 2; its last stderr line (the error), with
    no traceback before."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "error: " in last
    return last


def trace_cli(capsys, *args):
    """(status, stdout, stderr) of python -m skip.trace ARGS, run in this process."""
    from skip.trace.__main__ import main
    try:
        main([str(a) for a in args])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def trace_refused(capsys, *args):
    """python -m skip.trace ARGS, run in this process, ends with status 2 and one line on stderr,
    no traceback; that line."""
    code, out, err = trace_cli(capsys, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    return err
