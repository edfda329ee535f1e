"""What a per-token exit costs a batch: the Unified Layer Skipping paper's argument (its
introduction) that with a per-token early exit a batch runs until its deepest row, measured.

python -m skip.harness.bench_exits [--batches 1 2 4 8] [--max-new-tokens 24] [--runs 3] [--r 2]
                                   [--tau T] [--top-k 4096] [--queue N] [--threads 2] [--out runs]

For each batch size B, the first B prompts of the Spec-Bench mix (round robin over its
categories, first turns, chat-encoded) decode as one batch with the confidence early exit
(tau calibrated for L / r layers per token on two math prompts, as bench_cost; or --tau) and
with AdaInfer for generation (the paper's gap >= 0.8 rule at every layer), both with the cheap
check (a head over the --top-k most frequent tokens of the model's own answers to the next B
prompts; 0: full-head checks) and state propagation. Per generated token fed back: the layers
the batch ran (its deepest live row's exit + 1, ExitDecode.layers_run) against the layers the
row wanted (its own exit + 1); at B = 1 they are equal. Beside them, decode tokens/s (the
decode alone, timing.DecodeClock; median of --runs interleaved with plain batched greedy
decoding, model.generate, at the same B), the speedup over that, and the share of tokens equal
to plain decoding's, position by position. No EOS: every row decodes --max-new-tokens.
Writes runs/bench-exits.{json,md}.

--queue N: the first N prompts wait in a queue and B rows decode at once, the next prompt taking
a row when one ends (model/queue.py; plain decoding through generate_queue); the whole queue is
timed, prefills included. Writes runs/bench-exits-queue.{json,md}.
"""
from __future__ import annotations

import statistics

import torch

from model import generate, generate_queue
from model.cli import command, r_and_top_k_within, float_in, int_in, non_negative, positive
from tokenizer import encode_chat

from ..adainfer import Threshold
from ..adainfer_gen import generate_adainfer
from ..baselines import calibrate_threshold, generate_early_exit
from ..exit_decode import frequent_vocab
from .data import SPECBENCH, specbench, specbench_mix
from .report import markdown_table, publish, token_match
from .runner import Contender, compare, parser, settings, start

GAP = 0.8  # AdaInfer's gap threshold (the paper's)


def contenders(model, tau, vocab, N, B=None):
    """The three decoders, each on one batch, or (B) a queue through B rows."""
    plain = (lambda ps: generate(model, ps, max_new_tokens=N, eos=[])) if B is None else \
        (lambda ps: generate_queue(model, ps, B, max_new_tokens=N, eos=[]))
    return [Contender("plain", plain, model),
            Contender("early exit", lambda ps: generate_early_exit(model, ps, tau, N, eos=[], vocab=vocab,
                                                                   batch_size=B), model),
            Contender(f"AdaInfer gap>={GAP}", lambda ps: generate_adainfer(model, ps, Threshold(GAP), N, vocab=vocab,
                                                                           eos=[], batch_size=B), model)]


def measure(model, prompts, methods, N, runs, decode_only=True):
    """One batch: per method the layers run and wanted per generated token fed back, decode
    tokens/s against plain greedy decoding's, and token match with it."""
    got = compare(methods, [prompts], runs, warmup=1, decode_only=decode_only)
    fed = len(prompts) * (N - 1)  # tokens fed back per decode
    plain = got["plain"]
    rows = {}
    for m in methods[1:]:
        out = got[m.name].outputs[0]
        rows[m.name] = {"layers_run": statistics.fmean(x for r in out for x in r.layers_run),
                        "layers_wanted": statistics.fmean(x for r in out for x in r.layers_wanted),
                        "tokens_per_s": got[m.name].tokens_per_s(fed), "plain_tokens_per_s": plain.tokens_per_s(fed),
                        "speedup": plain.ms[0] / got[m.name].ms[0],
                        "token_match": statistics.mean(token_match(r.tokens, p) for r, p in zip(out, plain.outputs[0]))}
    return rows


@command
@torch.no_grad()
def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--batches", type=positive, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-new-tokens", type=int_in(2), default=24)
    ap.add_argument("--runs", type=positive, default=3)
    ap.add_argument("--r", type=float_in(1), default=2.0, help="the early exit's target speedup, for its tau")
    ap.add_argument("--tau", type=float_in(0, 1), help="the early exit's threshold (default: calibrated for --r)")
    ap.add_argument("--top-k", type=non_negative, default=4096, help="tokens in the cheap heads (0: full-head checks)")
    ap.add_argument("--queue", type=positive, help="a queue of this many prompts through each B rows")
    a = ap.parse_args(argv)
    if a.queue is not None and a.queue < max(a.batches):
        ap.error(f"--queue {a.queue}: fewer prompts than --batches {max(a.batches)} rows")
    if len(set(a.batches)) < len(a.batches):
        ap.error(f"--batches lists a size twice: {' '.join(map(str, a.batches))}")
    pool = len(SPECBENCH) * min(len(specbench(c)) for c in SPECBENCH)  # specbench_mix takes them in turn
    if (a.queue or max(a.batches)) + (max(a.batches) if a.top_k else 0) > pool:  # --top-k: the next B_max pick it
        what = f"the queue of {a.queue} prompts" if a.queue else "one batch of the largest size"
        ap.error(f"--batches {max(a.batches)}: the Spec-Bench pool holds {pool} prompts, {what}"
                 f"{' and one more batch of that size for the cheap head' if a.top_k else ''} must fit")
    r_and_top_k_within(ap, a)
    model, tok = start(a)
    N, B_max = a.max_new_tokens, max(a.batches)
    prompts = specbench_mix(tok, a.queue or B_max)
    vocab = None
    if a.top_k:
        vocab = frequent_vocab(generate(model, specbench_mix(tok, B_max, skip=len(prompts)), max_new_tokens=N),
                               n=a.top_k)
    tau = a.tau
    if tau is None:
        tau = calibrate_threshold(model, [encode_chat(tok, q) for q, _ in specbench("math_reasoning", 2)], a.r, 12, 7)
    results = []
    for B in a.batches:
        methods = contenders(model, tau, vocab, N, B if a.queue else None)
        ps = prompts if a.queue else prompts[:B]
        for m, row in measure(model, ps, methods, N, a.runs, decode_only=not a.queue).items():
            results.append({"method": m, "batch": B, **row})
            print(f"B={B} {m}: {row['layers_run']:.1f} layers run, {row['layers_wanted']:.1f} wanted per token, "
                  f"{row['tokens_per_s']:.1f} tokens/s (plain {row['plain_tokens_per_s']:.1f})", flush=True)
    res = {"settings": settings(a), "tau": tau, "gap": GAP,
           "cheap_head": 0 if vocab is None else len(vocab), "layers": model.cfg.n_layers, "rows": results}
    write_report(res, a.out, "bench-exits-queue" if a.queue else "bench-exits")


def write_report(res, out, name):
    rows = [[r["method"], r["batch"], r["layers_run"], r["layers_wanted"], r["layers_run"] / r["layers_wanted"],
             r["tokens_per_s"], r["plain_tokens_per_s"], f"{r['speedup']:.2f}x", r["token_match"]] for r in res["rows"]]
    head = "full-head checks" if not res["cheap_head"] else f"checks through a {res['cheap_head']}-token head"
    queue = res["settings"]["queue"]
    md = [f"{res['layers']} layers; early exit tau {res['tau']:.3f}, AdaInfer gap >= {res['gap']}, {head}"
          + (f"; a queue of {queue} prompts through B rows, the whole queue timed" if queue else "") +
          ". Per generated token: layers the batch ran (its deepest row) against the layers the row wanted.", "",
          markdown_table(rows, ["method", "B", "layers run / token", "layers wanted / token", "run / wanted",
                                "tokens/s", "plain tokens/s", "speedup", "token match"],
                         floatfmt=("", "", ".1f", ".1f", ".2f", ".1f", ".1f", "", ".3f"), right=range(1, 9))]
    publish(out, name, res, "\n".join(md))


if __name__ == "__main__":
    main()
