"""python -m model generate --model DIR --prompt TEXT   stream a (chat) answer, then tokens/s
python -m model demo [--model DIR]                    the decoder's per-layer API on a real model"""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path

import torch

from tokenizer import encode_chat, load_tokenizer

from . import flops
from .cli import command, seed_number
from .decoder import positions
from .generate import generate
from .loader import add_load_args, load_model


DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "weights" / "smollm2-135m-instruct"  # = weights.DEFAULT_MODEL


def open_model(path, dtype="float32", device="cpu"):
    path = Path(path)
    if not (path / "config.json").exists():
        hint = " (run `make weights` first)" if path == DEFAULT_MODEL else ""
        raise ValueError(f"no model at {path}{hint}")
    tok = load_tokenizer(path)
    return load_model(path, dtype, device=device), tok, bool(tok.chat_template)


def stream(model, tok, ids, out=None, **kw):
    """Generate, printing text (to out, default the current stdout) as soon as its bytes form
    whole characters; returns (tokens, stats)."""
    out = sys.stdout if out is None else out
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = set(model.cfg.eos_token_id)
    times = []

    def on_token(step, t):
        times.append(time.perf_counter())
        if int(t[0]) not in stops:
            out.write(decoder.decode(tok.token_bytes(int(t[0]))))
            out.flush()

    t0 = time.perf_counter()
    new = generate(model, [ids], on_token=on_token, **kw)[0]
    out.write(decoder.decode(b"", final=True) + "\n")
    n = len(times)
    decode_s = times[-1] - times[0]
    return new, {"prompt_tokens": len(ids), "new_tokens": n, "prefill_s": times[0] - t0,
                 "decode_tokens_per_s": (n - 1) / decode_s if n > 1 else float("nan")}


def cmd_generate(a):
    model, tok, chat = open_model(a.model, a.dtype, a.device)
    ids = encode_chat(tok, a.prompt) if chat and not a.no_chat else tok.encode(a.prompt)
    gen = torch.Generator(model.device).manual_seed(a.seed)
    _, s = stream(model, tok, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                  top_k=a.top_k, top_p=a.top_p, generator=gen)
    print(f"[{s['prompt_tokens']} prompt tokens, prefill {s['prefill_s'] * 1000:.0f} ms; "
          f"{s['new_tokens']} new tokens at {s['decode_tokens_per_s']:.1f} tokens/s]", file=sys.stderr)


@torch.no_grad()
def cmd_demo(a):
    model, tok, chat = open_model(a.model, a.dtype, a.device)
    cfg = model.cfg
    question = "What is the capital of France? Answer in one sentence."
    print(f"model: {a.model}\n  {cfg.n_layers} layers, d={cfg.dim}, {cfg.n_heads} heads / {cfg.n_kv_heads} KV heads, "
          f"vocab {cfg.vocab_size}\n\nuser: {question}\nassistant: ", end="")
    ids = encode_chat(tok, question) if chat else tok.encode(question)
    with model.recording() as runs:
        new, s = stream(model, tok, ids, max_new_tokens=48)
    print(f"\n{len(new)} tokens, prefill {s['prefill_s'] * 1000:.0f} ms, {s['decode_tokens_per_s']:.1f} tokens/s; "
          f"{flops.total(cfg, runs) / 1e9:.2f} GFLOPs in all "
          f"({flops.decode_flops(cfg, len(ids)) / 1e6:.0f} MFLOPs per token at context {len(ids)})")

    # The logit lens through the per-layer API: what would each layer say the first answer token is?
    print(f"\nlogit lens at the last prompt position (the full model says {tok.decode(new[:1])!r}):")
    x = torch.tensor([ids], device=model.device)
    pos = positions(None, 0, x.shape[1], x.device)
    rows = []

    def lens(i, h, attn_out, mlp_out):
        if i % 5 == 4 or i == cfg.n_layers - 1:
            p = model.logits(h, last_only=True)[0, -1].float().softmax(-1)
            top = p.topk(2)
            rows.append((i, tok.decode([int(top.indices[0])]), float(top.values[0]), float(top.values[0] - top.values[1])))

    model.run_layers(model.embed_tokens(x, pos), pos, callback=lens)
    print("  layer  top-1            p(top1)  gap")
    for i, t, p, g in rows:
        print(f"  {i:5d}  {t!r:15s}  {p:7.3f}  {g:5.3f}")


@command
@torch.no_grad()  # restores the grad mode on return: main may run inside a test
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", default=DEFAULT_MODEL, type=Path)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=seed_number, default=0)
    g.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, no chat template")
    add_load_args(g)
    d = sub.add_parser("demo", help="a chat answer and the logit lens on a real model")
    d.add_argument("--model", default=DEFAULT_MODEL, type=Path)
    add_load_args(d)
    a = ap.parse_args(argv)
    {"generate": cmd_generate, "demo": cmd_demo}[a.cmd](a)  # numbers are checked by generate: one line, status 2


if __name__ == "__main__":
    main()
