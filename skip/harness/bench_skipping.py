"""Unified Layer Skipping against early exit and SkipDecode at the same target speedup: the
paper's comparison (its translation and summarization tables) on SmolLM2-135M-Instruct and Spec-Bench.

python -m skip.harness.bench_skipping [--r 2 3 5] [--n-quality 30] [--max-new 40] [--beams 4] [--batches 1 2 8]

Every row at a target r is meant to spend the same budget, and shows what it spent: measured
layers per decoded token and decode FLOPs per token against the full model's. Quality: ROUGE-L
(rouge-score) on Spec-Bench summarization and BLEU (sacrebleu) on its translation prompts,
greedy and with the official evaluation's decoding (beam search, --beams wide, no-repeat
3-grams; early exit has no beam form), and for each target r the paired bootstrap of Unified's
per-summary ROUGE-L against every other method at that r (are 30 short summaries enough to
rank them?); next-token agreement with the full model and perplexity on
held-out text (MT-Bench questions with their GPT-4 reference answers, teacher-forced: the
question through all layers, the answer through the method's layers). Throughput: decode
tokens/s at each batch size over `--tok-new` new tokens per prompt (the decode alone, from the
first token fed back: timing.DecodeClock), median of `--runs`, the methods taking turns
within each run; speedup against the full model, and beside it the ceiling its FLOPs allow
(full decode FLOPs / method decode FLOPs, from the decoder's record of what ran).
Fine-tuned rows appear for checkpoints weights/<method>-<r>x made by skip.train.finetune.
Writes runs/bench-skipping.json, runs/bench-skipping.md and runs/skipping.png.
"""
from __future__ import annotations

import statistics

import numpy as np
import torch
from tqdm import tqdm

from model import beam_search, flops, generate, load_model
from model.cli import command, non_negative, positive
from tokenizer import encode_chat

from ..baselines import calibrate_threshold, generate_early_exit
from ..train.finetune import response_layer_sets, tuned_checkpoint
from ..layerwise import layerwise_forward, prompt_then
from .data import mtbench_references, specbench
from .report import markdown_table, publish
from .runner import Contender, compare, parser, settings, start


class Method:
    """One row: how it decodes (batched or not) and which layers response positions run."""

    def __init__(self, name, r, model, tuned, L, tau=None):
        self.name, self.r, self.model, self.tuned, self.tau = name, r, model, tuned, tau
        self.batchable = name != "early exit"
        if name == "full":
            self.layer_sets = lambda n: [range(L)] * n
        elif name in ("unified", "skipdecode"):
            self.layer_sets = response_layer_sets(name, L, r)
        self.label = name if name == "full" else f"{name} {r}x" + (" (fine-tuned)" if tuned else "")

    def decode(self, prompts, max_new, eos=None, beams=0):
        """Greedy, or beam search with the official evaluation's settings (no_repeat_ngram_size 3).
        The first new token comes from the prompt pass; the max_new - 1 fed back follow layer_sets."""
        if self.name == "early exit":
            if beams:
                return None  # its exit is decided per token of one sequence: no beams
            return [generate_early_exit(self.model, p, self.tau, max_new, eos=eos).tokens for p in prompts]
        sets = self.layer_sets(max(1, max_new - 1))
        if beams:
            return beam_search(self.model, prompts, beams, max_new, no_repeat_ngram_size=3, eos=eos,
                               decode_layers=lambda i: sets[i])
        return generate(self.model, prompts, max_new_tokens=max_new, eos=eos, decode_layers=lambda i: sets[i])

    @torch.inference_mode()
    def forced_logits(self, prompt, response):  # (len(response), V)
        if self.name == "early exit":
            return torch.stack(generate_early_exit(self.model, prompt, self.tau, forced=response).logits)
        runs = prompt_then(self.model.cfg.n_layers, len(prompt), self.layer_sets(len(response) - 1))
        ids = torch.tensor([prompt + response[:-1]], device=self.model.device)
        return layerwise_forward(self.model, ids, runs)[0, len(prompt) - 1:]


def quality(m, tok, summ, trans, texts, full_argmax, max_new, beams):
    from rouge_score import rouge_scorer
    import sacrebleu

    cost = [0, 0, 0]  # decode tokens, layer runs, FLOPs: what the greedy answers spent

    def answers(pairs, beams=0):
        prompts = [encode_chat(tok, q) for q, _ in pairs]
        outs = []
        for i in range(0, len(prompts), 8):
            with m.model.recording() as record:
                out = m.decode(prompts[i:i + 8], max_new, beams=beams)
            if out is None:
                return None
            outs += out
            if not beams:
                cost[:] = [a + b for a, b in zip(cost, flops.per_decode_token(m.model.cfg, record))]
        return [tok.decode([t for t in o if t not in m.model.cfg.eos_token_id]).strip() for o in outs]

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out = {}
    for kind, n in (("greedy", 0), ("beam", beams)):
        if kind == "beam" and not beams:
            break
        summaries, translations = answers(summ, n), answers(trans, n)
        if summaries is None:
            out[kind] = None
            continue
        rouges = [100 * scorer.score(ref, o)["rougeL"].fmeasure for (_, ref), o in zip(summ, summaries)]
        out[kind] = {"rougeL": statistics.mean(rouges), "rougeL_per_prompt": rouges,
                     "bleu": sacrebleu.corpus_bleu(translations, [[ref for _, ref in trans]]).score}
    agree, nll, n = 0, 0.0, 0
    for i, (prompt, response) in enumerate(texts):
        logits = m.forced_logits(prompt, response).float()
        agree += int((logits.argmax(-1) == full_argmax[i]).sum())
        target = torch.tensor(response, device=logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        n += len(response)
    return {**out["greedy"], "beam": out.get("beam"), "agreement": agree / n,
            "perplexity": float(torch.exp(torch.tensor(nll / n))),
            "layers_per_token": cost[1] / cost[0], "flops_per_token": cost[2] / cost[0]}


def paired_bootstrap(a, b, resamples=2000, seed=0):
    """Mean of a - b over paired prompts, its 95% percentile-bootstrap interval (scipy), and how
    many prompts a scores higher on."""
    from scipy.stats import bootstrap

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    ci = bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=0.95, method="percentile",
                   random_state=np.random.default_rng(seed)).confidence_interval
    return {"mean": float(d.mean()), "low": float(ci.low), "high": float(ci.high), "higher": int((d > 0).sum()),
            "n": len(d)}


def unified_leads(rows):
    """Per target r: Unified (its fine-tuned row when there is one) against every other row at
    that r and the full model, paired over the same summaries."""
    out = []
    for r in sorted({row["r"] for row in rows if row["name"] == "unified"}):
        at_r = [row for row in rows if row["name"] == "unified" and row["r"] == r]
        u = max(at_r, key=lambda row: row["fine_tuned"])
        for other in rows:
            if other is not u and (other["r"] == r or other["name"] == "full"):
                out.append({"r": r, "unified": u["method"], "against": other["method"],
                            **paired_bootstrap(u["rougeL_per_prompt"], other["rougeL_per_prompt"])})
    return out


def throughputs(methods, prompts, batch, n_new, runs):
    """Decode tokens/s of every method: (n_new - 1) fed-back tokens per prompt over the time of
    the decode alone (the prefill, the same full pass for every method, is outside); the decode
    FLOPs: the recorded total minus the prefill's, from one untimed recorded run (which also warms
    up); then the methods take turns within every run (runner.compare), unrecorded."""
    chunk = prompts[:batch]
    T = max(len(p) for p in chunk)  # left-padded prompt length; the prompt pass is the same for all
    timed = [m for m in methods if m.batchable or batch == 1]
    decode_flops = {}
    for m in timed:
        with m.model.recording() as record:
            m.decode(chunk, n_new, eos=[])
        decode_flops[m.label] = flops.total(m.model.cfg, record) - batch * flops.prefill_flops(m.model.cfg, T)
    got = compare([Contender(m.label, lambda ps, m=m: m.decode(ps, n_new, eos=[]), m.model) for m in timed],
                  [chunk], runs)
    return [{"tokens_per_s": got[m.label].tokens_per_s(batch * (n_new - 1)), "flops": decode_flops[m.label]}
            if m.label in got else None for m in methods]


@command
@torch.no_grad()  # restores the grad mode on return: main may run inside a test
def main(argv=None):
    ap = parser(__doc__, threads=None)
    ap.add_argument("--r", type=positive, nargs="+", default=[2, 3, 5])
    ap.add_argument("--n-quality", type=int, default=30, help="Spec-Bench prompts per category")
    ap.add_argument("--n-heldout", type=positive, default=10, help="MT-Bench reference answers")
    ap.add_argument("--heldout-tokens", type=positive, default=64, help="reference-answer tokens scored per text")
    ap.add_argument("--max-new", type=positive, default=40)
    ap.add_argument("--beams", type=non_negative, default=4, help="beam width of the official decoding (0: greedy only)")
    ap.add_argument("--batches", type=positive, nargs="+", default=[1, 2, 8])
    ap.add_argument("--tok-new", type=int, default=24, help="new tokens per prompt in the throughput runs")
    ap.add_argument("--runs", type=positive, default=3)
    a = ap.parse_args(argv)
    if a.n_quality < 2:
        ap.error("--n-quality must be at least 2: the paired bootstrap resamples the summaries")
    if a.tok_new < 2:
        ap.error("--tok-new must be at least 2: the decode timed is that of the tokens fed back")
    base, tok = start(a)
    L = base.cfg.n_layers
    summ, trans = specbench("summarization", a.n_quality), specbench("translation", a.n_quality)
    texts = [(encode_chat(tok, q), tok.encode(ans)[:a.heldout_tokens])
             for q, ans in mtbench_references(a.n_heldout)]
    tp_prompts = [encode_chat(tok, q) for q, _ in specbench("qa", max(a.batches))]
    if max(a.r) > L or max(a.batches) > len(tp_prompts):
        ap.error(f"need --r <= {L} (the layers) and --batches <= {len(tp_prompts)} (Spec-Bench's QA prompts)")
    calib = [encode_chat(tok, q) for q, _ in specbench("math_reasoning", 2)]

    full = Method("full", 1, base, False, L)
    methods = [full]
    for r in a.r:
        methods.append(Method("early exit", r, base, False, L, tau=calibrate_threshold(base, calib, r, 24, 7)))
        for name in ("skipdecode", "unified"):
            methods.append(Method(name, r, base, False, L))
            ck = tuned_checkpoint(base.cfg, name, r)
            if ck is not None:
                methods.append(Method(name, r, load_model(ck, a.dtype, device=a.device), True, L))

    full_argmax = [full.forced_logits(p, resp).argmax(-1) for p, resp in texts]
    rows, bar = [], tqdm(total=len(methods) + len(a.batches), desc="methods, then batch sizes")
    for m in methods:
        row = {"method": m.label, "name": m.name, "r": m.r, "fine_tuned": m.tuned, "tau": m.tau, "throughput": {}}
        row.update(quality(m, tok, summ, trans, texts, full_argmax, a.max_new, a.beams))
        rows.append(row)
        bar.set_postfix(method=m.label, refresh=False)
        bar.update()
    for b in a.batches:
        for row, t in zip(rows, throughputs(methods, tp_prompts, b, a.tok_new, a.runs)):
            row["throughput"][b] = t
        bar.set_postfix(batch=b, refresh=False)
        bar.update()
    bar.close()
    ref = rows[0]["throughput"]
    for row in rows:
        for b, t in row["throughput"].items():
            if t is not None:
                t["speedup"] = t["tokens_per_s"] / ref[b]["tokens_per_s"]
                t["flops_ceiling"] = ref[b]["flops"] / t["flops"]
    res = {"model": str(a.model), "args": settings(a), "rows": rows,
           "rougeL_paired": unified_leads(rows)}
    publish(a.out, "bench-skipping", res, table(rows, a.batches) + "\n\n" + paired_table(res["rougeL_paired"]))
    plot(rows, a.batches[0], a.out / "skipping.png")


def table(rows, batches):
    """Quality beside what each row spent: measured layers per decoded token and decode FLOPs per
    token against the full model's, so equal compute is visible."""
    full = rows[0]["flops_per_token"]

    def speed(t):
        return "N/A" if t is None else f"{t['tokens_per_s']:.1f} ({t['speedup']:.2f}x / {t['flops_ceiling']:.2f}x)"
    cells = [[r["method"], r["layers_per_token"], r["flops_per_token"] / full, r["rougeL"], r["bleu"],
              "N/A" if r["beam"] is None else f"{r['beam']['rougeL']:.1f} / {r['beam']['bleu']:.1f}", r["agreement"],
              r["perplexity"], *(speed(r["throughput"][b]) for b in batches)] for r in rows]
    return markdown_table(cells, ["method", "layers / token", "FLOPs / token vs full", "ROUGE-L", "BLEU",
                                  "ROUGE-L / BLEU, beam", "agreement", "perplexity",
                                  *(f"tok/s b={b} (speedup / FLOPs ceiling)" for b in batches)],
                          floatfmt=("", ".1f", ".2f", ".1f", ".1f", "", ".3f", ".1f", *[""] * len(batches)))


def paired_table(pairs):
    return markdown_table([[f"{p['r']}x", p["unified"], p["against"],
                            f"{p['mean']:+.1f} ({p['low']:+.1f} to {p['high']:+.1f})", f"{p['higher']} / {p['n']}"]
                           for p in pairs], ["r", "Unified", "against", "ROUGE-L difference (95% bootstrap)",
                                             "summaries where Unified is higher"])


def plot(rows, batch, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, key, label in zip(axes, ("rougeL", "bleu", "agreement"),
                              ("ROUGE-L (summarization)", "BLEU (translation)", "next-token agreement")):
        for name, marker in (("full", "*"), ("early exit", "v"), ("skipdecode", "s"), ("unified", "o")):
            for tuned in (False, True):
                pts = sorted((r["throughput"][batch]["speedup"], r[key], r["r"]) for r in rows
                             if r["name"] == name and r["fine_tuned"] == tuned)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="--" if tuned else "-",
                            label=name + (" (fine-tuned)" if tuned else ""))
                    for x, y, r in pts:
                        ax.annotate(f"{r}x", (x, y), fontsize=7)
        ax.set_xlabel(f"measured speedup, batch {batch}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Quality against measured speedup (labels: target r), SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
