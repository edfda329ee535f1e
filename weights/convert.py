"""GGUF (llama.cpp) -> a HF-style directory: config.json, model.safetensors (fp32), tokenizer files.

Architectures: llama (Llama, and Mistral, which llama.cpp writes as llama, without its window),
qwen2 (Qwen2, Qwen2.5: q/k/v biases) and qwen3 (q/k norms; biases when present). Dequantization
uses the `gguf` package of the llama.cpp project (Q4_1, Q8_0, F16, F32 and the rest it knows).
For llama, llama.cpp's converter permutes the rows of the Q and K projections (per head, from HF's
"rotate_half" pairing to interleaved pairs); we undo that here so the tensors are in HF layout.
Qwen's it leaves in HF's pairing (llama.cpp runs them with NeoX-style RoPE). Tokenizer files are
written for the byte-level BPE pre-tokenizers the project implements (GPT-2's, SmolLM2's); for any
other (Qwen2's, a SentencePiece vocabulary) the weights are converted and the tokenizer is not,
which the log and conversion.json say. The output is written by weights.files.atomic_dir (a temporary
directory beside the target, moved in at the end), so a failure never leaves a half-written model
behind nor loses the one it replaces; an output that is or holds the GGUF is refused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from model.jsonfile import read_json
from tokenizer.bpe import BPETokenizer
from weights.files import OutputExists, atomic_dir, check_target

DONE = "conversion.json"  # written last: its presence means the directory is complete

LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF general.architecture, each also its HF model_type
PRE_TOKENIZERS = ("gpt-2", "smollm")  # tokenizer.ggml.pre values written (GPT-2's regex; SmolLM2's digits first)
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


class ConvertError(RuntimeError):
    pass


def hf_tensor_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    blk, i, kind, suffix = (name.split(".") + ["", "", ""])[:4]
    if blk != "blk" or kind not in LAYER_NAMES:
        raise ConvertError(f"unknown GGUF tensor {name!r}")
    return f"model.layers.{i}.{LAYER_NAMES[kind]}.{suffix}"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: rows (head, pair, 2) -> (head, 2, pair)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        for t in reader.tensors:  # touch every tensor so a truncated file fails here
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes")
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ConvertError(f"{path} is not a readable GGUF file (truncated or corrupted?): {e}") from e
    return reader


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_config(reader, names) -> dict:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConvertError(f"GGUF architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)})")
    p = lambda k, d=None: field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_heads, dim = p("attention.head_count"), p("embedding_length")
    head_dim = p("attention.key_length", p("rope.dimension_count", dim // n_heads))
    scaling = p("rope.scaling.type")
    if scaling not in (None, "none", "linear"):  # YaRN and the rest change every logit
        raise ConvertError(f"GGUF rope scaling {scaling!r} is not supported ('none', 'linear')")
    rope = {"rope_scaling": {"rope_type": "linear", "factor": p("rope.scaling.factor")}} if scaling == "linear" else {}
    return {**rope,
        "model_type": arch, "architectures": [f"{arch.title()}ForCausalLM"], "hidden_act": "silu",
        "vocab_size": len(field(reader, "tokenizer.ggml.tokens")), "hidden_size": dim,
        "intermediate_size": p("feed_forward_length"), "num_hidden_layers": p("block_count"),
        "num_attention_heads": n_heads, "num_key_value_heads": p("attention.head_count_kv", n_heads),
        "head_dim": head_dim, "max_position_embeddings": p("context_length"),
        "rms_norm_eps": p("attention.layer_norm_rms_epsilon"), "rope_theta": p("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in names, "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False, "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"), "torch_dtype": "float32",
    }


def unsupported_tokenizer(reader):
    """Why this GGUF's tokenizer cannot be written as one the project reads, or None."""
    model, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")
    if model != "gpt2":
        return f"tokenizer model {model!r} is not byte-level BPE ('gpt2')"
    if pre not in PRE_TOKENIZERS:
        return f"pre-tokenizer {pre!r} is not implemented ({', '.join(PRE_TOKENIZERS)})"
    return None


def tokenizer_files(reader, path) -> dict[str, dict]:
    """tokenizer.json in HF's schema and tokenizer_config.json with the chat template.

    The pre-tokenizer is SmolLM2's own (every digit alone, then GPT-2's byte-level regex), which is
    what llama.cpp's 'smollm' pre-tokenizer does; transformers' GGUF reader skips the digit split."""
    tok = BPETokenizer.from_gguf(path)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in sorted(tok.specials.items(), key=lambda x: x[1])]
    split_digits = field(reader, "tokenizer.ggml.pre") == "smollm"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]} \
        if split_digits else byte_level
    merges = sorted(tok.ranks, key=tok.ranks.get)
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre, "post_processor": None, "decoder": dict(byte_level, add_prefix_space=True),
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": tok.vocab, "merges": [list(m) for m in merges]}}
    tokens = field(reader, "tokenizer.ggml.tokens")
    name = lambda key: None if field(reader, key) is None else tokens[field(reader, key)]  # noqa: E731
    config = {"chat_template": field(reader, "tokenizer.chat_template"), "bos_token": name("tokenizer.ggml.bos_token_id"),
              "eos_token": name("tokenizer.ggml.eos_token_id"), "pad_token": name("tokenizer.ggml.padding_token_id"),
              "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False))}
    return {"tokenizer.json": spec, "tokenizer_config.json": config}


def source_id(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return {"source": path.name, "sha256": h.hexdigest()}


def convert(gguf_path, out_dir, log=print, force=False) -> bool:
    """Convert; returns False (and does nothing) when out_dir already holds this conversion. A
    folder out_dir that this command did not write is refused (force=True replaces it)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ConvertError(f"{gguf_path} does not exist")
    try:  # first: an output that is, or holds, the GGUF is refused, --force or not
        check_target(out_dir, DONE, force, reads=(gguf_path,))
    except OutputExists as e:
        raise ConvertError(str(e)) from e
    src = source_id(gguf_path)
    if (out_dir / DONE).exists():
        if read_json(out_dir / DONE, "conversion record", 1 << 20).get("sha256") == src["sha256"]:
            log(f"{out_dir} already holds {gguf_path.name} converted to fp32; nothing to do")
            return False
        if not force:
            raise ConvertError(f"{out_dir} holds a different conversion; pass --force to replace it")
    reader = read_gguf(gguf_path)
    names = {t.name for t in reader.tensors}
    cfg = hf_config(reader, names)
    no_tokenizer = unsupported_tokenizer(reader)

    from gguf import dequantize

    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(s) for s in reversed(t.shape)])
        if cfg["model_type"] == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute(w, cfg["num_attention_heads"])
        elif cfg["model_type"] == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute(w, cfg["num_key_value_heads"])
        tensors[hf_tensor_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
        log(f"  {t.name:28s} {t.tensor_type.name:5s} -> {hf_tensor_name(t.name)} {tuple(w.shape)}")

    with atomic_dir(out_dir, DONE, force=True, reads=(gguf_path,)) as tmp:  # checked above, before the slow part
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name, content in ({} if no_tokenizer else tokenizer_files(reader, gguf_path)).items():
            (tmp / name).write_text(json.dumps(content, ensure_ascii=False, indent=1))
        record = dict(src, tensors=len(tensors))
        if no_tokenizer:
            record["tokenizer"] = f"not converted: {no_tokenizer}"
        (tmp / DONE).write_text(json.dumps(record, indent=2))
    log(f"wrote {out_dir} ({len(tensors)} tensors, fp32)" + (no_tokenizer and f"; no tokenizer files: {no_tokenizer}" or ""))
    return True
