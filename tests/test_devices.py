"""Every method on any device and in any dtype. On the CPU (always): every method gives its
oracle's tokens in float32, bfloat16 and float16 (the oracle run in the same dtype), every CLI
takes --device and --dtype and runs in the three dtypes (the benchmarks, minutes in all, in the
CLI lane: `make test-clis`, the tests marked clis), and a device that this machine lacks is a
clear error. The GPU lane (`make test-gpu`, the tests marked gpu; skipped without a GPU): the
golden test and every method's equivalence test on the GPU in fp32, and every method's tokens
in bf16 equal to the same method's on the CPU in bf16."""
import pytest
import torch

from model import beam_search, generate, load_model
from model.loader import LoadError
from skip.adainfer import Threshold
from skip.adainfer_gen import generate_adainfer
from skip.baselines import generate_early_exit, generate_skipdecode, skipdecode_layers, skipdecode_schedule
from skip.kangaroo import generate_kangaroo
from skip.unified import generate_unified, kept_layers
from conftest import VARIANTS, build_hf, hf_generate, random_adapter, reference_decode, transformers

GPUS = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="no CUDA device")]),
        pytest.param("mps", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.backends.mps.is_available(),
                                                                          reason="no MPS device")])]
DTYPES = ["float32", "bfloat16", "float16"]
PROMPTS = [[5, 6, 7, 8, 9, 10], [9, 3]]


def every_method(model, vocab_size):
    """Each method's tokens on this model, greedy, with its cheap-head options where it has them."""
    torch.manual_seed(0)
    adapter = random_adapter(model, 2, 0, lens_like=True).to(model.device, model.dtype)
    cheap = torch.arange(0, vocab_size, 2)
    p, n = PROMPTS[0], 8
    return {
        "generate (batched, padded)": generate(model, PROMPTS, max_new_tokens=n, eos=[]),
        "beam search": beam_search(model, PROMPTS, 2, n, no_repeat_ngram_size=2, eos=[]),
        "unified": generate_unified(model, PROMPTS, 2, max_new_tokens=n, eos=[]),
        "skipdecode": generate_skipdecode(model, PROMPTS, 2, max_new_tokens=n, eos=[]),
        "early exit": generate_early_exit(model, p, 0.3, n, eos=[], vocab=cheap).tokens,
        "adainfer": generate_adainfer(model, p, Threshold(0.3), n, vocab=cheap, eos=[]).tokens,
        "kangaroo": generate_kangaroo(model, p, adapter, max_new_tokens=n, draft_vocab=20, eos=[]).tokens,
        "kangaroo, lens": generate_kangaroo(model, p, l=2, max_new_tokens=n, eos=[]).tokens,
    }


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_every_method_gives_its_oracles_tokens_in_every_dtype_on_the_cpu(llama_dir, dtype):
    """Each oracle run in the same dtype: greedy decoding (batched, left-padded) and beam search give
    transformers' tokens; Unified and SkipDecode the cache-free reference's over their layer sets;
    the early exit and AdaInfer the reference's over the layers each token ran (at tau 0.1 some
    tokens stop after the first layer, some run every layer); Kangaroo, lossless, greedy decoding's."""
    model = load_model(llama_dir, dtype)
    assert model.dtype == getattr(torch, dtype) and model.new_cache(1, 4).k.dtype == model.dtype
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=model.dtype).eval()
    hf.generation_config.eos_token_id = None  # the full length, as eos=[]
    L, V, n = model.cfg.n_layers, model.cfg.vocab_size, 8
    out = every_method(model, V)
    plain = out["generate (batched, padded)"]
    assert plain == hf_generate(hf, PROMPTS, None, max_new_tokens=n)
    assert out["beam search"] == hf_generate(hf, PROMPTS, None, num_beams=2, no_repeat_ngram_size=2, max_new_tokens=n)
    K, schedule = kept_layers(L, 2), skipdecode_schedule(L, 2, n)
    assert out["unified"] == reference_decode(model, PROMPTS, lambda i: K, n)
    assert out["skipdecode"] == reference_decode(model, PROMPTS, lambda i: skipdecode_layers(L, schedule, i), n)
    for name in ("early exit", "adainfer", "kangaroo", "kangaroo, lens"):  # tau 0.3 never stops on this model
        assert out[name] == plain[0], name
    cheap = torch.arange(0, V, 2)
    for res in (generate_early_exit(model, PROMPTS[0], 0.1, n, eos=[], vocab=cheap),
                generate_adainfer(model, PROMPTS[0], Threshold(0.1), n, vocab=cheap, eos=[])):
        assert {0, L - 1} <= set(res.exit_layers)
        assert res.tokens == reference_decode(model, PROMPTS[:1], lambda i: range(res.exit_layers[i] + 1), n)[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_equals_transformers_bit_for_bit(tmp_path, variant, dtype):
    """Loaded in bf16 or fp16 by both, the prompt's logits are identical and greedy decoding gives
    the same tokens: the same casts (norms in fp32, RoPE angles in fp32 applied in the model's
    dtype) and the same products (F.linear in half precision)."""
    build_hf(*VARIANTS[variant]).save_pretrained(tmp_path, safe_serialization=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=getattr(torch, dtype)).eval()
    ours = load_model(tmp_path, dtype)
    for seed in range(2):
        ids = torch.randint(3, ours.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert torch.equal(ours(ids), hf(ids).logits)
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=hf.config.pad_token_id)[0, 12:].tolist()
        assert generate(ours, [ids[0].tolist()], 12, eos=[])[0] == ref


def test_a_device_this_machine_lacks_is_a_clear_error(llama_dir):
    missing = "cuda" if not torch.cuda.is_available() else "cuda:99"
    with pytest.raises(LoadError, match="not available on this machine"):
        load_model(llama_dir, device=missing)
    with pytest.raises(LoadError, match="not a device name"):
        load_model(llama_dir, device="gpu0")


CLIS = {  # module: arguments of a small run on tiny_chat_dir ({adapter}: a Kangaroo adapter for it)
    "model.__main__": ["generate", "--prompt", "hi", "--max-new-tokens", "3"],
    "skip.trace.__main__": ["write", "--prompt", "hi", "--max-new-tokens", "3", "--out", "{tmp}/t"],
    "skip.harness.eval_adainfer": ["--tasks", "antonym:0", "--n-train", "4", "--n-test", "4", "--time-n", "1",
                                   "--out", "{tmp}"],
    "skip.train.finetune": ["--method", "skipdecode", "--steps", "2", "--out", "{tmp}/ft"],
    "skip.train.kangaroo": ["--prompts", "3", "--new-tokens", "4", "--held-out", "1", "--steps", "2", "--batch", "2",
                            "--out", "{tmp}/ad"],
    "skip.harness.bench_products": ["--rows", "1", "2", "--runs", "1", "--out", "{tmp}"],
}
SLOW_CLIS = {  # minutes in three dtypes: the CLI lane (make test-clis)
    "skip.harness.bench": ["--quick", "--parts", "products", "--out", "{tmp}"],  # passes its options on
    "skip.harness.demo": ["--prompts", "1", "--max-new", "4", "--adapter", "{adapter}"],
    "skip.harness.eval_adainfer_gen": ["--n-train", "1", "--n-test", "1", "--max-new", "4", "--out", "{tmp}"],
    "skip.harness.bench_decoder": ["--runs", "1", "--out", "{tmp}/d.json"],
    "skip.harness.bench_cost": ["--per-category", "1", "--max-new-tokens", "3", "--repeats", "1", "--top-k", "64",
                                "--out", "{tmp}"],
    "skip.harness.bench_kangaroo": ["--adapter", "{adapter}", "--per-category", "1", "--max-new-tokens", "4",
                                    "--repeats", "1", "--no-sweep", "--top-k", "64", "--out", "{tmp}"],
    "skip.harness.bench_skipping": ["--r", "2", "--n-quality", "2", "--n-heldout", "1", "--heldout-tokens", "4",
                                    "--max-new", "3", "--beams", "2", "--batches", "1", "--tok-new", "3", "--runs", "1",
                                    "--out", "{tmp}"],
}
LANES = [(m, d) for m in CLIS for d in DTYPES] + [pytest.param(m, d, marks=pytest.mark.clis)
                                                  for m in SLOW_CLIS for d in DTYPES]


@pytest.fixture(scope="module")
def chat_adapter(tiny_chat_dir, tmp_path_factory):
    from skip.kangaroo_files import save_adapter
    path = tmp_path_factory.mktemp("chat_adapter")
    save_adapter(random_adapter(load_model(tiny_chat_dir), 2, 0, lens_like=True), path, force=True)
    return path


@pytest.mark.parametrize("module,dtype", LANES)
def test_clis_run_in_every_dtype(tiny_chat_dir, chat_adapter, data_dir, tmp_path, module, dtype, capsys, monkeypatch):
    import importlib
    mod = importlib.import_module(module)
    if module == "skip.train.kangaroo":
        monkeypatch.setattr(mod, "CACHE", tmp_path / "cache")  # its answers and states: not into runs/
    args = [a.format(tmp=tmp_path, adapter=chat_adapter) for a in {**CLIS, **SLOW_CLIS}[module]]
    args += ["--model", str(tiny_chat_dir)]
    mod.main(args + ["--device", "cpu", "--dtype", dtype])
    if module in ("model.__main__", "skip.trace.__main__"):  # the two that answer bad input with status 2
        with pytest.raises(SystemExit) as e:
            mod.main(args + ["--device", "cuda:99"])
        assert e.value.code == 2 and "not available on this machine" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["skip.harness." + m for m in ("bench", "bench_decoder", "bench_cost", "bench_kangaroo",
                                    "bench_products", "bench_skipping", "demo", "eval_adainfer", "eval_adainfer_gen")]
                         + ["skip.train.finetune", "skip.train.kangaroo"])
def test_every_other_cli_takes_device_and_dtype(module, capsys):
    import importlib
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    out = capsys.readouterr().out
    assert "--device DEVICE" in out and "--dtype {float32,bfloat16,float16}" in out


# ---------------------------------------------------------------- the GPU lane
@pytest.mark.parametrize("device", GPUS)
def test_golden_logits_on_the_gpu_match_transformers_on_the_cpu(pair, device):
    hf, ours = pair
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.to(device)(ids.to(device)).cpu()
    ours.to("cpu")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", GPUS)
def test_equivalences_hold_on_the_gpu_in_fp32(llama_dir, device):
    model = load_model(llama_dir, device=device)
    n = 8
    plain = generate(model, PROMPTS, max_new_tokens=n, eos=[])
    K = kept_layers(model.cfg.n_layers, 2)
    assert generate_unified(model, PROMPTS, 2, max_new_tokens=n, eos=[]) == reference_decode(model, PROMPTS,
                                                                                             lambda i: K, n)
    assert generate_adainfer(model, PROMPTS[0], None, n, eos=[]).tokens == plain[0]
    for a in (random_adapter(model, 2, 0, lens_like=True).to(device), None):
        assert generate_kangaroo(model, PROMPTS[0], a, l=2, max_new_tokens=n, eos=[]).tokens == plain[0]


@pytest.mark.parametrize("device", GPUS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_method_on_the_gpu_gives_the_cpus_tokens(llama_dir, device, dtype):
    cpu, gpu = load_model(llama_dir, dtype), load_model(llama_dir, dtype, device=device)
    assert every_method(gpu, gpu.cfg.vocab_size) == every_method(cpu, cpu.cfg.vocab_size)
