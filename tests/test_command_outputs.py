"""Whole commands and their outputs (weights/files.py as the commands use it): a command never
replaces a folder it reads, under any name and --force or not; `skip.trace show` writes only a
picture; and a command killed while it writes leaves its folder as it was before it started."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import load_model

from skip import ROOT


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def main_of(module):
    import importlib
    m = importlib.import_module(module)
    return m.main if hasattr(m, "main") else importlib.import_module(module + ".__main__").main


def test_a_command_never_replaces_the_folder_it_reads_force_or_not(llama_dir, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(llama_dir, model)
    (model / "x.gguf").write_bytes(b"GGUF, refused before it is read")
    (tmp_path / "link").symlink_to(model)
    before = snapshot(tmp_path)
    calls = [  # (module, arguments): --out is the input, holds it, or is another name of it
        ("skip.trace", "write", "--model", model, "--prompt", "x", "--out", model, "--force"),
        ("skip.trace", "write", "--model", model, "--prompt", "x", "--out", tmp_path, "--force"),
        ("skip.trace", "write", "--model", model, "--prompt", "x", "--out", tmp_path / "link", "--force"),
        ("skip.trace", "write", "--model", tmp_path / "link", "--prompt", "x", "--out", model, "--force"),
        ("skip.trace", "write", "--model", llama_dir, "--method", "kangaroo", "--settings",
         json.dumps({"adapter": str(model)}), "--prompt", "x", "--out", model, "--force"),
        ("weights", "convert", model / "x.gguf", "--out", model, "--force"),
        ("weights", "convert", model / "x.gguf", "--out", model),
        ("skip.kangaroo_official", model / "x.gguf", "--l", "1", "--model", llama_dir, "--out", model, "--force"),
        ("skip.kangaroo_official", tmp_path / "a", "--l", "1", "--model", model, "--out", model, "--force"),
        ("skip.train.finetune", "--model", model, "--out", model, "--force"),
        ("skip.train.kangaroo", "--model", model, "--out", model, "--force"),
    ]
    for module, *args in calls:
        with pytest.raises(SystemExit) as e:
            main_of(module)(list(map(str, args)))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "which this command reads" in err, (args, err)
        assert snapshot(tmp_path) == before and (tmp_path / "link").is_symlink()
    for module, *args in calls[0], calls[5]:  # the same as whole processes: one line, status 2
        p = run_cli(module, *args)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert snapshot(tmp_path) == before
    load_model(model)


def test_the_trace_show_cli_refuses_a_device_as_its_picture_in_one_line(llama_dir, tmp_path, capsys):
    from skip.trace.methods import trace
    m = load_model(llama_dir)
    trace(m, [3, 14, 15], tmp_path / "t", "full", max_new_tokens=2)
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        node = Path("/dev/null")
    with pytest.raises(SystemExit) as e:
        main_of("skip.trace")(["show", str(tmp_path / "t"), "--out", str(node)])
    assert e.value.code == 2 and "is not a regular file" in capsys.readouterr().err
    assert stat.S_ISCHR(node.stat().st_mode)


def test_the_trace_show_cli_replaces_only_a_picture_and_nothing_it_reads(llama_dir, tmp_path, capsys):
    """--out at the trace's own trace.json, a model's config.json or any user file: one line,
    status 2, the file as it was; at a folder it reads: refused; at an old picture: replaced."""
    from skip.trace.methods import trace
    trace(load_model(llama_dir), [3, 14, 15], tmp_path / "t", "full", max_new_tokens=2)
    (tmp_path / "notes.txt").write_text("mine")
    targets = [tmp_path / "t" / "trace.json", llama_dir / "config.json", tmp_path / "notes.txt"]
    before = {p: p.read_bytes() for p in targets}
    for out, said in [*((p, "is not a PNG picture") for p in targets), (tmp_path / "t", "is not a regular file")]:
        with pytest.raises(SystemExit) as e:
            main_of("skip.trace")(["show", str(tmp_path / "t"), "--model", str(llama_dir), "--out", str(out)])
        assert e.value.code == 2 and said in capsys.readouterr().err, out
    assert {p: p.read_bytes() for p in targets} == before
    for _ in range(2):  # a new picture, then the picture replaced
        main_of("skip.trace")(["show", str(tmp_path / "t"), "--out", str(tmp_path / "t.png")])
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- whole commands killed
def kill_while_writing(cmd, out, sig=signal.SIGTERM):
    """Start cmd, send sig once its temporary output folder holds a file, wait for it to end."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(f.is_file() for d in out.parent.glob(f".{out.name}.partial-*") for f in d.iterdir()):
        assert p.poll() is None, f"{cmd} ended before it wrote anything"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.send_signal(sig)
    return p.wait(timeout=60)


# Killed mid-write, a command leaves its folder exactly as before it started (empty), so the next
# run starts as a first run does; that a first run completes is every other test of these commands
# (the session's conversion of SmolLM2, tests/test_devices.py's fine-tunes). The two writers of the
# largest files, each killed (one real process each), on a model wide enough (200 MB of tensors)
# that the kill lands while its tensors are written, yet cheap to run: a few thin layers over
# SmolLM2's tokenizer, its tensors written directly (random, no initialisation). V: a smaller
# vocabulary (a GGUF's token list is parsed token by token; the fine-tune needs the tokenizer's).
def wide_model(path, smollm2_dir, d=512, f=64, L=4, V=None):
    from safetensors.torch import save_file
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    cfg.update(hidden_size=d, intermediate_size=f, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
               head_dim=d // 4, tie_word_embeddings=False, vocab_size=V or cfg["vocab_size"])
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    V, kv = cfg["vocab_size"], d // 2
    shapes = {"model.embed_tokens.weight": (V, d), "lm_head.weight": (V, d), "model.norm.weight": (d,)}
    for i in range(L):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in {
            "input_layernorm": (d,), "post_attention_layernorm": (d,), "self_attn.q_proj": (d, d),
            "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, d),
            "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}.items()})
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()},
              path / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


def test_a_conversion_killed_mid_write_leaves_nothing_behind(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from test_families import write_gguf
    hf = AutoModelForCausalLM.from_pretrained(wide_model(tmp_path / "m", smollm2_dir, d=2048, L=1, V=8192))
    write_gguf(hf, "llama", tmp_path / "wide.gguf")
    shutil.rmtree(tmp_path / "m")
    out = tmp_path / "wide"
    cmd = [sys.executable, "-m", "weights", "convert", str(tmp_path / "wide.gguf"), "--out", str(out)]
    assert kill_while_writing(cmd, out) != 0
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["wide.gguf"]


def test_a_fine_tune_killed_mid_write_leaves_nothing_behind(smollm2_dir, data_dir, tmp_path):
    model = wide_model(tmp_path / "wide", smollm2_dir)
    out = tmp_path / "unified-2x"
    cmd = [sys.executable, "-m", "skip.train.finetune", "--model", str(model), "--steps", "1",
           "--max-tokens", "64", "--out", str(out)]
    assert kill_while_writing(cmd, out) != 0
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["wide"]
