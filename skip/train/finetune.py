"""Fine-tuning with a skip pattern (as the Unified Layer Skipping paper does), also used for the
SkipDecode baseline so that the comparison is fair.

The prompt passes through all layers, each response token through the method's layers only
(exactly as at inference, see skip/layerwise.py); the loss is the cross-entropy of the
response tokens; the embeddings (and with them a tied LM head) stay frozen. Training pairs
are instruction/response pairs from AlpacaEval (instruction, output) and GSM8K train
(question, answer) in the model's chat format; evaluation uses other data (Spec-Bench).

python -m skip.train.finetune --method unified --r 2 [--minutes 30] [--steps N] [--device cpu]
writes weights/<method>-<r>x/ (config.json, model.safetensors, finetune.json).
With --lora RANK (ours, not the paper's) it trains low-rank adapters (skip/train/lora.py) on the layers
the response runs instead, and writes weights/<method>-<r>x-lora/ (adapter.safetensors,
adapter.json): a few MB, committed for r = 2 so that `make demo` shows the fine-tuned method. The
committed one: `--method unified --r 2 --lora 8 --max-tokens 128 --minutes 13` (267 steps, one
CPU thread shared with other jobs; its adapter.json holds the settings and losses).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import add_load_args, load_config, load_model, save_model
from model.cli import command, float_in, positive, seed_number
from tokenizer import encode_chat, load_tokenizer
from weights.files import OutputExists, atomic_dir, check_target

from .. import DATA, DEFAULT_MODEL, WEIGHTS
from ..baselines import skipdecode_layer_sets
from ..layerwise import layerwise_forward, prompt_then
from .lora import attach, save_lora
from ..unified import kept_layers


def training_pairs(tok, data_dir=DATA, max_tokens=256, seed=0, n=None):
    """(prompt ids, response ids) from AlpacaEval and GSM8K train, shuffled with a seed; the first
    n that fit (tokenizing all 8,278 texts takes a while; a run of n steps uses n pairs)."""
    rows = [json.loads(line) for line in (Path(data_dir) / "alpaca" / "alpaca_eval.jsonl").open()]
    texts = [(r["instruction"], r["output"]) for r in rows]
    rows = [json.loads(line) for line in (Path(data_dir) / "gsm8k" / "train.jsonl").open()]
    texts += [(r["question"], r["answer"]) for r in rows]
    random.Random(seed).shuffle(texts)
    pairs = []
    for instruction, response in texts:
        p = encode_chat(tok, instruction)
        r = tok.encode(response + "<|im_end|>")
        if len(p) + 8 <= max_tokens:
            pairs.append((p, r[:max_tokens - len(p)]))
            if len(pairs) == n:
                break
    return pairs


def response_layer_sets(method, L, r):
    """n -> the layer sets of response positions 0..n-1: the pattern the method decodes with
    (SkipDecode's schedule spread over the n positions, so the budget is the same as Unified's)."""
    if method == "unified":
        K = kept_layers(L, r)
        return lambda n: [K] * n
    if method == "skipdecode":
        return lambda n: skipdecode_layer_sets(L, r, n)
    raise ValueError(f"unknown method {method!r} (unified, skipdecode)")


def response_loss(model, prompt, response, layer_sets):
    """Cross-entropy of the response tokens, response position t running only layer_sets(n)[t]."""
    ids = torch.tensor([prompt + response[:-1]], device=model.device)
    runs = prompt_then(model.cfg.n_layers, len(prompt), layer_sets(len(response) - 1))
    logits = layerwise_forward(model, ids, runs)[0, len(prompt) - 1:]  # (n_resp, V)
    return F.cross_entropy(logits.float(), torch.tensor(response, device=ids.device))


def set_lr(opt, lr, step, steps, warmup, t0, minutes=None):
    """Linear warmup, then cosine decay over the run's progress: the larger of the steps and the
    time budget used, so the decay ends with the run whichever limit stops it. False once spent,
    except at step 0: a run takes at least one step, however small its budget."""
    done = max(step / steps, 0.0 if minutes is None else (time.perf_counter() - t0) / (60 * minutes))
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return done < 1.0 or step == 0


class MixedPrecision:
    """What the optimiser steps. In fp32 the parameters themselves. In bf16 and fp16, fp32 master
    copies, copied back after each step: an AdamW update of lr 3e-5 is below a half-precision
    weight's resolution and would be lost. In fp16 also a static loss scale, since its gradients
    underflow; a step whose fp16 gradients are not finite is skipped."""

    def __init__(self, params, dtype):
        self.params, self.half = list(params), dtype != torch.float32
        self.master = [p.detach().float().requires_grad_() for p in self.params] if self.half else self.params
        self.scale = 2.0 ** 12 if dtype == torch.float16 else 1.0

    def backward(self, loss):
        """loss.backward() into the master gradients; False if the step must be skipped."""
        (loss * self.scale).backward()
        if not self.half:
            return True
        for m, p in zip(self.master, self.params):
            m.grad, p.grad = (None if p.grad is None else p.grad.float() / self.scale), None
        if self.scale == 1.0:  # bf16 has fp32's range
            return True
        return bool(torch.isfinite(torch.stack([m.grad.abs().max() for m in self.master if m.grad is not None])).all())

    @torch.no_grad()
    def copy_back(self):
        if self.half:
            for m, p in zip(self.master, self.params):
                p.copy_(m)


def finetune(model, pairs, layer_sets, steps, minutes=None, lr=2e-5, warmup=20, clip=1.0, desc="fine-tune",
             params=None):
    """AdamW with linear warmup and cosine decay, gradient clipping; in half precision with fp32
    master weights (MixedPrecision). Trains `params` (default: every weight but the embeddings,
    which stay frozen). Stops after `steps` steps or `minutes` minutes, whichever comes first.
    Returns the losses."""
    model.train()
    if params is None:
        params = [p for name, p in model.named_parameters() if not name.startswith(("embed.", "pos_embed.", "head."))]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    mp = MixedPrecision(params, model.dtype)
    opt = torch.optim.AdamW(mp.master, lr=lr, weight_decay=0.0)
    bar, losses, t0 = tqdm(total=steps, desc=desc), [], time.perf_counter()
    for step in range(steps):
        if not set_lr(opt, lr, step, steps, warmup, t0, minutes):
            break
        prompt, response = pairs[step % len(pairs)]
        loss = response_loss(model, prompt, response, layer_sets)
        opt.zero_grad(set_to_none=True)
        if mp.backward(loss):
            torch.nn.utils.clip_grad_norm_(mp.master, clip)
            opt.step()
            mp.copy_back()
        losses.append(loss.item())
        bar.set_postfix(loss=sum(losses[-20:]) / len(losses[-20:]), refresh=False)
        bar.update()
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def tuned_checkpoint(cfg, method, r):
    """weights/<method>-<r>x if a completed fine-tune (finetune.json, written last) of a model with
    this config is there, else None: a checkpoint of another model is not this one's fine-tune."""
    ck = WEIGHTS / f"{method}-{r}x"
    return ck if (ck / "finetune.json").exists() and load_config(ck) == cfg else None


def loss_record(losses):
    return {"steps": len(losses), "first_loss_avg20": sum(losses[:20]) / len(losses[:20]),
            "final_loss_avg20": sum(losses[-20:]) / len(losses[-20:])}


@command
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--method", choices=["unified", "skipdecode"], default="unified")
    ap.add_argument("--r", type=positive, default=2, help="target speedup")
    ap.add_argument("--steps", type=positive, default=2000)
    ap.add_argument("--minutes", type=float_in(0, lo_open=True), default=30.0,
                    help="wall-clock budget (default about 30 minutes; at least one step runs)")
    ap.add_argument("--lr", type=float_in(0, lo_open=True), help="default 3e-5, with --lora 1e-3")
    ap.add_argument("--lora", type=positive, metavar="RANK", help="train low-rank adapters of this rank (skip/train/lora.py)")
    ap.add_argument("--max-tokens", type=positive, default=256)
    ap.add_argument("--seed", type=seed_number, default=0)
    add_load_args(ap)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--force", action="store_true", help="replace an output folder this command did not write")
    a = ap.parse_args(argv)
    a.lr = (1e-3 if a.lora else 3e-5) if a.lr is None else a.lr
    torch.manual_seed(a.seed)
    out = a.out or WEIGHTS / f"{a.method}-{a.r}x{'-lora' if a.lora else ''}"
    marker = "adapter.json" if a.lora else "finetune.json"
    try:  # before the training, not after it
        check_target(out, marker, a.force, reads=(a.model, DATA))
    except OutputExists as e:
        ap.error(str(e))
    cfg, tok = load_config(a.model), load_tokenizer(a.model)  # the checks that need them before the slow work
    try:
        layer_sets = response_layer_sets(a.method, cfg.n_layers, a.r)
        layer_sets(a.max_tokens)
    except ValueError as e:  # r above the layer count
        ap.error(f"--r {a.r}: {e}")
    shortest = len(encode_chat(tok, "")) + 8  # a chat prompt, and room for a response
    if not shortest <= a.max_tokens <= cfg.max_seq_len:
        ap.error(f"--max-tokens {a.max_tokens}: need {shortest} (the shortest chat prompt and 8 response tokens) "
                 f"to {cfg.max_seq_len} (the model's context)")
    model = load_model(a.model, a.dtype, device=a.device)
    pairs = training_pairs(tok, max_tokens=a.max_tokens, seed=a.seed, n=a.steps)
    if not pairs:
        ap.error(f"no training prompt fits --max-tokens {a.max_tokens} with room for a response")
    record = {"base_model": a.model.name, "method": a.method, "r": a.r, "lr": a.lr, "minutes": a.minutes,
              "max_tokens": a.max_tokens, "seed": a.seed, "data": ["alpaca/alpaca_eval.jsonl", "gsm8k/train.jsonl"]}
    if a.lora:
        layers = sorted(set().union(*map(set, layer_sets(a.max_tokens))))  # every layer a response position runs
        mods = attach(model, layers, a.lora)
        losses = finetune(model, pairs, layer_sets, a.steps, a.minutes, a.lr, desc=f"{a.method} {a.r}x lora {a.lora}",
                          params=[p for m in mods.values() for p in m.parameters()])
        save_lora(mods, out, model, a.force, **record, **loss_record(losses))
        print(f"saved {out} after {len(losses)} steps; loss {losses[0]:.3f} -> "
              f"{loss_record(losses)['final_loss_avg20']:.3f}")
        return
    losses = finetune(model, pairs, layer_sets, a.steps, a.minutes, a.lr, desc=f"{a.method} {a.r}x")
    with atomic_dir(out, "finetune.json", a.force, reads=(a.model, DATA)) as tmp:  # finetune.json last: the marker
        save_model(model, tmp, a.model)
        (tmp / "finetune.json").write_text(json.dumps({**record, **loss_record(losses)}, indent=2))
    print(f"saved {out} after {len(losses)} steps; loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}")


if __name__ == "__main__":
    main()
