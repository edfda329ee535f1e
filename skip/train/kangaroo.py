"""Training Kangaroo's adapter by self-distillation (the paper's "Early Exiting as Self-Drafting
Model"; the official train.py).

1. The model answers prompts greedily (its own distribution, which is what the adapter will
   have to draft); the token sequences are cached as JSON. The prompts mix the kinds of request
   a chat model meets (`prompt_mix`): AlpacaEval's instructions and "Summarize:" over its
   reference answers (AlpacaEval is an evaluation set; only its prompts are used here, and no
   evaluation here scores on it), CommonsenseQA train questions asked openly, and GSM8K train
   problems. The evaluations here read other data (Spec-Bench, CommonsenseQA dev), with one
   exception: AlpacaEval holds two MT-Bench questions, which Spec-Bench holds too, and the
   committed adapter's training prompts include one of them (Spec-Bench's first MT-Bench one).
2. One pass of the model over each sequence caches what training needs: h_l (the input of A)
   and h_L (the last layer's output, whose head gives the target p); not the 49k-wide p itself.
3. A is trained with the soft cross-entropy  -sum_v p(v) log q(v),  p = softmax(H(norm(h_L))),
   q = softmax(H(A(h_l))), over every answer position (the official loss mask), with one of two
   recipes (RECIPES): the project's (the default) or the official train.py's (--recipe official).
Held-out sequences measure top-1 agreement (argmax q = argmax p) on response positions.

python -m skip.train.kangaroo [--l 2] [--recipe project|official] [--prompts N] [--new-tokens N] [--steps N]
writes weights/kangaroo-l<l>/ (adapter.safetensors, adapter.json; -official for that recipe).
Caches go to runs/kangaroo/.
The defaults took 26 minutes on 2 CPU cores (11 to answer the prompts, 2 to cache the
states, 13 to train); they made the committed weights/kangaroo-l2 (same seed, same result).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model import add_load_args, generate, load_config, load_model
from model.cli import command, float_in, positive, seed_number
from model.jsonfile import read_json
from tokenizer import encode_chat, load_tokenizer
from weights.files import OutputExists, atomic_file, cache_key, check_target, device_tag, write_text_atomic

from .. import DATA, DEFAULT_MODEL, RUNS, WEIGHTS
from .finetune import MixedPrecision, set_lr
from ..kangaroo_adapter import Adapter
from ..kangaroo_files import save_adapter

CACHE = RUNS / "kangaroo"


MIX = {"chat": 0.35, "summarize": 0.25, "qa": 0.2, "math": 0.2}  # shares of the prompts
SOURCES = {"alpaca/alpaca_eval.jsonl": ["chat", "summarize"], "csqa/train_rand_split.jsonl": ["qa"],
           "gsm8k/train.jsonl": ["math"]}  # AlpacaEval for its prompts; CSQA and GSM8K train splits


def prompt_mix(n, data_dir=DATA, seed=0, max_words=150):
    """n user messages: the MIX shares of each kind, shuffled with a seed. Without the mix
    (GSM8K holds 90% of AlpacaEval + GSM8K) the adapter learnt math answers and little else."""
    data_dir, rng = Path(data_dir), random.Random(seed)
    alpaca, csqa, gsm = ([json.loads(line) for line in (data_dir / f).open()] for f in SOURCES)
    for rows in (alpaca, csqa, gsm):
        rng.shuffle(rows)
    counts = {k: round(n * share) for k, share in MIX.items()}
    counts["chat"] += n - sum(counts.values())
    if counts["chat"] + counts["summarize"] > len(alpaca):  # AlpacaEval feeds 60% of the mix
        raise ValueError(f"{n} prompts need {counts['chat'] + counts['summarize']} AlpacaEval rows; it has {len(alpaca)}")
    texts = [r["instruction"] for r in alpaca[:counts["chat"]]]
    texts += ["Summarize: " + " ".join(r["output"].split()[:max_words])  # answers to other instructions
              for r in alpaca[counts["chat"]:counts["chat"] + counts["summarize"]]]
    texts += [r["question"]["stem"] for r in csqa[:counts["qa"]]]
    texts += [r["question"] for r in gsm[:counts["math"]]]
    rng.shuffle(texts)
    return texts


def stale(path, e):
    """A cache file that is cut short or not what this run needs is rebuilt, with a warning."""
    print(f"warning: rebuilding the unreadable cache file {path} ({type(e).__name__}: {e})", file=sys.stderr)


def self_distill(model, prompts, new_tokens, batch=16, path=None):
    """Prompt + the model's greedy answer, per prompt; cached in path (JSON) when given."""
    if path is not None and path.exists():
        try:
            seqs = read_json(path, "cached answers")
            if not (isinstance(seqs, list) and len(seqs) == len(prompts) and all(
                    isinstance(s, dict) and s.get("prompt") == len(p) and isinstance(s.get("ids"), list)
                    and s["ids"][:len(p)] == p and all(type(t) is int for t in s["ids"]) for s, p in zip(seqs, prompts))):
                raise ValueError(f"not the {len(prompts)} answers to this run's prompts")
            return seqs
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            stale(path, e)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    seqs, bar = [None] * len(prompts), tqdm(total=len(prompts), desc="self-distillation answers")
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        for i, ans in zip(idx, generate(model, [prompts[i] for i in idx], max_new_tokens=new_tokens)):
            seqs[i] = {"prompt": len(prompts[i]), "ids": prompts[i] + ans}
        bar.update(len(idx))
    bar.close()
    if path is not None:
        write_text_atomic(path, json.dumps(seqs))
    return seqs


@torch.inference_mode()
def exit_states(model, seqs, l, path=None):
    """(h_l, h_L) per sequence, each (T, d), from one pass; cached in path (safetensors)."""
    if path is not None and path.exists():
        try:
            t = load_file(str(path))
            out = [(t[f"{i}.l"], t[f"{i}.L"]) for i in range(len(seqs))]
            if len(t) != 2 * len(seqs) or any(x.shape != (len(s["ids"]), model.cfg.dim)
                                               for s, pair in zip(seqs, out) for x in pair):
                raise ValueError(f"not the states of these {len(seqs)} sequences")
            return out
        except (SafetensorError, KeyError, ValueError) as e:
            stale(path, e)
    out, bar = [], tqdm(total=len(seqs), desc=f"caching h_{l} and h_L")
    for s in seqs:
        ids = torch.tensor([s["ids"]], device=model.device)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        h_l = model.run_layers(model.embed_tokens(ids, pos), pos, range(l))
        h_L = model.run_layers(h_l, pos, range(l, model.cfg.n_layers))
        out.append((h_l[0].cpu(), h_L[0].cpu()))
        bar.update()
    bar.close()
    if path is not None:
        with atomic_file(path) as tmp:
            save_file({f"{i}.{k}": x.contiguous() for i, pair in enumerate(out) for k, x in zip("lL", pair)}, str(tmp))
    return out


def batch_of(states, seqs, idx, device):
    """Right-padded (B, T, d) inputs and targets, and a (B, T) mask of the positions that
    predict answer tokens (the loss mask: as in the official data, not the user's prompt)."""
    T = max(len(states[i][0]) for i in idx)
    h_l = states[idx[0]][0].new_zeros(len(idx), T, states[idx[0]][0].shape[-1])  # in the states' dtype
    h_L, mask = torch.zeros_like(h_l), torch.zeros(len(idx), T, dtype=torch.bool)
    for b, i in enumerate(idx):
        n = len(states[i][0])
        h_l[b, :n], h_L[b, :n], mask[b, seqs[i]["prompt"] - 1:n - 1] = states[i][0], states[i][1], True
    return h_l.to(device), h_L.to(device), mask.to(device)


def distill_loss(model, adapter, h_l, h_L, mask):
    """Soft cross-entropy of q against p on the masked positions, and top-1 agreement there."""
    pos = torch.arange(h_l.shape[1], device=h_l.device)[None]
    with torch.no_grad():
        p = model.logits(h_L[mask][None])[0].float().softmax(-1)  # (N, V)
    # right padding never reaches a real position under the causal mask
    z = adapter(h_l, adapter.rope(model, pos))[mask]  # (N, d)
    log_q = (z @ model.head.weight.T).float().log_softmax(-1)  # (N, V)
    loss = -(p * log_q).sum(-1).mean()
    return loss, (log_q.argmax(-1) == p.argmax(-1)).float().mean()


def agreement(model, adapter, states, seqs, idx, device):
    """Top-1 agreement of the draft with M on the answer positions of sequences idx."""
    with torch.no_grad():
        hits = [(distill_loss(model, adapter, *batch_of(states, seqs, [i], device))[1],
                 len(seqs[i]["ids"]) - seqs[i]["prompt"]) for i in idx]
    return sum(float(a) * n for a, n in hits) / max(1, sum(n for _, n in hits))


# Two training recipes. "official" is the official code's train.py (Equationliu/Kangaroo):
# AdapterModel(config) freshly built (PyTorch's default init: nothing copied from the model),
# AdamW lr 3e-5, betas (0.9, 0.95), torch's default weight decay 0.01, batch 4,
# get_linear_schedule_with_warmup(2000 warm-up steps, 800000 total), clip_grad_value_ 0.5.
# "project" (the default, which made weights/kangaroo-l2) starts from layer l's attention and
# the final norm: lr 1e-3, no weight decay, 30 warm-up steps, cosine decay, gradient-norm clip 1.
RECIPES = {
    "project": dict(init="from_model", lr=1e-3, weight_decay=0.0, warmup=30, schedule="cosine", clip="norm",
                    clip_at=1.0),
    "official": dict(init="random", lr=3e-5, weight_decay=0.01, warmup=2000, schedule="linear", clip="value",
                     clip_at=0.5, total=800_000),
}


def linear_lr(opt, lr, step, warmup, total):
    """transformers' get_linear_schedule_with_warmup at this step (0 at step 0, as its LambdaLR)."""
    scale = step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))
    for group in opt.param_groups:
        group["lr"] = lr * scale


def train(model, adapter, states, seqs, idx, steps, minutes=None, batch=4, seed=0, recipe="project", lr=None):
    """AdamW with the recipe's schedule and clipping, over steps or minutes (whichever ends first)."""
    rc = RECIPES[recipe]
    lr = rc["lr"] if lr is None else lr
    mp = MixedPrecision(adapter.parameters(), model.dtype)  # fp32 master weights in bf16 and fp16
    opt = torch.optim.AdamW(mp.master, lr=lr, betas=(0.9, 0.95), weight_decay=rc["weight_decay"])
    rng, device = random.Random(seed), model.device
    bar, losses, t0 = tqdm(total=steps, desc=f"training the adapter ({recipe})"), [], time.perf_counter()
    adapter.train()
    for step in range(steps):
        if rc["schedule"] == "cosine":
            running = set_lr(opt, lr, step, steps, rc["warmup"], t0, minutes)
        else:
            linear_lr(opt, lr, step, rc["warmup"], rc["total"])
            running = minutes is None or time.perf_counter() - t0 < 60 * minutes or step == 0  # one step at least
        if not running:
            break
        loss, agree = distill_loss(model, adapter, *batch_of(states, seqs, rng.sample(idx, batch), device))
        opt.zero_grad(set_to_none=True)
        if mp.backward(loss):
            if rc["clip"] == "norm":
                torch.nn.utils.clip_grad_norm_(mp.master, rc["clip_at"])
            else:
                torch.nn.utils.clip_grad_value_(mp.master, rc["clip_at"])
            opt.step()
            mp.copy_back()
        losses.append(loss.item())
        bar.set_postfix(loss=sum(losses[-20:]) / len(losses[-20:]), agree=float(agree), refresh=False)
        bar.update()
    bar.close()
    adapter.eval()
    return losses


def tokens_by_frequency(seqs, vocab_size):
    """Every token id, most frequent in the training answers first (ties: lower id first)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in seqs:
        counts += torch.bincount(torch.tensor(s["ids"][s["prompt"]:], dtype=torch.long), minlength=vocab_size)
    return sorted(range(vocab_size), key=lambda v: (-int(counts[v]), v))


@command
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--l", type=positive, default=2, help="exit layer: A reads the output of layers [0, l)")
    ap.add_argument("--prompts", type=positive, default=480, help="prompts answered for self-distillation")
    ap.add_argument("--new-tokens", type=positive, default=128, help="length of each greedy answer")
    ap.add_argument("--held-out", type=positive, default=24, help="sequences kept out to measure agreement")
    ap.add_argument("--steps", type=positive, default=1100, help="about 13 minutes on 2 CPU cores")
    ap.add_argument("--minutes", type=float_in(0, lo_open=True),
                    help="also stop after this many minutes (not reproducible; at least one step runs)")
    ap.add_argument("--recipe", choices=list(RECIPES), default="project",
                    help="project: initialised from the model, lr 1e-3, cosine; official: the official train.py")
    ap.add_argument("--lr", type=float_in(0, lo_open=True), help="default: the recipe's (project 1e-3, official 3e-5)")
    ap.add_argument("--batch", type=positive, default=4)
    ap.add_argument("--seed", type=seed_number, default=0)
    add_load_args(ap)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--force", action="store_true", help="replace an output folder that is not an adapter")
    a = ap.parse_args(argv)
    if a.batch > a.prompts - a.held_out:
        ap.error(f"--prompts {a.prompts} less --held-out {a.held_out} leaves {a.prompts - a.held_out} training "
                 f"sequences; a batch of --batch {a.batch} needs at least that many")
    out = a.out or WEIGHTS / (f"kangaroo-l{a.l}" + ("" if a.recipe == "project" else f"-{a.recipe}"))
    try:  # before the training, not after it
        check_target(out, "adapter.json", a.force, reads=(a.model, DATA, CACHE))
    except OutputExists as e:
        ap.error(str(e))
    cfg = load_config(a.model)  # the checks that need the model's shape, before the slow work
    if not a.l < cfg.n_layers:
        ap.error(f"--l {a.l}: the exit layer must be in 1..{cfg.n_layers - 1} for this {cfg.n_layers}-layer model")
    tok = load_tokenizer(a.model)
    prompts = [encode_chat(tok, t) for t in prompt_mix(a.prompts, seed=a.seed)]
    if max(map(len, prompts)) + a.new_tokens > cfg.max_seq_len:
        ap.error(f"--new-tokens {a.new_tokens}: the longest prompt ({max(map(len, prompts))} tokens) and its answer "
                 f"exceed the model's context ({cfg.max_seq_len})")
    torch.manual_seed(a.seed)
    model = load_model(a.model, a.dtype, device=a.device).requires_grad_(False)
    tag = cache_key(a.model, [DATA / f for f in SOURCES], a.prompts, a.new_tokens, a.seed, *device_tag(model))
    seqs = self_distill(model, prompts, a.new_tokens, path=CACHE / f"answers-{tag}.json")
    states = exit_states(model, seqs, a.l, path=CACHE / f"states-{tag}-l{a.l}.safetensors")
    train_idx, test_idx = list(range(a.held_out, len(seqs))), list(range(a.held_out))

    rc = RECIPES[a.recipe]
    adapter = Adapter.from_model(model, a.l) if rc["init"] == "from_model" else Adapter(model.cfg, a.l)
    adapter = adapter.to(model.device, model.dtype)
    before = agreement(model, adapter, states, seqs, test_idx, model.device)
    losses = train(model, adapter, states, seqs, train_idx, a.steps, a.minutes, a.batch, a.seed, a.recipe, a.lr)
    after = agreement(model, adapter, states, seqs, test_idx, model.device)
    adapter.frequent = torch.tensor(tokens_by_frequency([seqs[i] for i in train_idx], model.cfg.vocab_size))
    save_adapter(adapter.cpu(), out, a.force, base_model=a.model.name, data={**SOURCES, "mix": MIX},
                 prompts=a.prompts, new_tokens=a.new_tokens, train_sequences=len(train_idx), steps=len(losses),
                 recipe=a.recipe, lr=a.lr or rc["lr"], batch=a.batch, seed=a.seed,
                 final_loss_avg20=sum(losses[-20:]) / len(losses[-20:]),
                 held_out_agreement_before=before, held_out_agreement=after)
    print(f"saved {out}: {len(losses)} steps, loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}, "
          f"held-out top-1 agreement {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
