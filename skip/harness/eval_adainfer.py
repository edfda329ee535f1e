"""AdaInfer evaluation: accuracy, exit layers, FLOPs and wall-clock per task, shot count and
scoring mode (full vocabulary, or restricted to the choice tokens).

python -m skip.harness.eval_adainfer [--tasks sst2 agnews csqa antonym:5 squad:0,5 ...] [--shots 0 5 10 15 20]
    [--modes full choices] [--n-train 60] [--n-test 60] [--transfer-model DIR]

Per (task, shots, mode): mode "choices" scores only the answer choices (a task without choices
is then scored over the full vocabulary, once); one traced pass per instance gives every layer's features and
prediction; SVM and CRF are fitted on the train split, then every stop rule is applied to
the test split's features (decisions are identical to a live run, see the tests). FLOPs
ratio = FLOPs of what AdaInfer runs (layers up to the exit on the whole prompt, plus one
LM-head call per layer for the features) / the full model's (all layers, one head call);
the paper's layers-only ratio is shown beside it. Wall-clock: live runs on --time-n test
prompts, AdaInfer against the full forward, in the same run. The oracle is a perfect
classifier: the earliest layer from which the prediction stays the final one. A setting whose
prompts exceed the model's context is not run, and the report says so. Generalisation, as the
paper studies it: in-task (train and test splits of one task), cross-task (an SVM fitted on one
task, and one on the QA tasks together, applied to the others) and cross-model (--transfer-model:
this model's SVM applied to another model's features; the paper transfers across sizes).
Writes runs/adainfer.json, runs/adainfer.md, runs/adainfer-sweep.png, runs/adainfer-exits.png.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model import flops, load_model
from model.cli import command, writable_folder
from tokenizer import load_tokenizer
from weights.files import atomic_file, cache_key, device_tag

from .. import RUNS
from ..adainfer import (DEFAULT_FEATURES, FEATURES, LABEL_RULES, SVM, CRFClassifier, Threshold, Trace,
                        oracle_layer, predict, trace)
from .report import markdown_table, publish
from .tasks import TASKS, encode, load_task
from .runner import parser, settings, start
from .timing import interleaved_ms

CACHE = RUNS / "adainfer-cache"


def exit_flops(cfg, T, layer, vocab):
    """AdaInfer's cost on a T-token prompt that exits after `layer` (features at every layer)."""
    return flops.embed_flops(cfg, T) + (layer + 1) * (flops.layer_flops(cfg, T) + flops.head_flops(cfg, 1, vocab))


def full_flops(cfg, T, vocab):
    return flops.embed_flops(cfg, T) + cfg.n_layers * flops.layer_flops(cfg, T) + flops.head_flops(cfg, 1, vocab)


def simulate(rule, traces, lengths, cfg, vocab):
    """Apply a stop rule (stop_at or 'oracle') to traced features: accuracy and costs."""
    L, rows = cfg.n_layers, []
    for tr, T in zip(traces, lengths):
        stop = oracle_layer(tr) if rule == "oracle" else rule.stop_at(iter(tr.feats.tolist()))
        layer = L - 1 if stop is None else stop
        rows.append((tr.top1[layer] == tr.answer, layer, exit_flops(cfg, T, layer, vocab) / full_flops(cfg, T, vocab)))
    acc, layers, ratio = (np.mean([r[i] for r in rows]) for i in range(3))
    return {"accuracy": float(acc), "avg_exit_layer": float(layers), "flops_ratio": float(ratio),
            "layers_ratio": float((layers + 1) / L), "exits": [int(r[1]) for r in rows]}


def traces_of(model, tag, encoded, vocab_of):
    """trace() of every (ids, answer, choices), cached in runs/adainfer-cache under a key of the
    model's content (tag), the inputs and the scored vocabularies, so an interrupted grid resumes;
    a cache file that is cut short or not what this run needs is rebuilt, with a warning."""
    vocabs = [vocab_of(ch) for _, _, ch in encoded]
    key = hashlib.sha256(repr((tag, encoded, [None if v is None else v.tolist() for v in vocabs])).encode())
    path = CACHE / f"{key.hexdigest()[:20]}.safetensors"
    if path.exists():
        try:
            t = load_file(str(path))
            n, L = len(encoded), t["top1"].shape[-1]
            if t["feats"].shape != (n, L, len(FEATURES)) or t["top1"].shape != (n, L) or t["answer"].shape != (n,):
                raise ValueError(f"shapes {[tuple(x.shape) for x in t.values()]} are not of {n} traces")
            return [Trace(f, top1.tolist(), int(ans)) for f, top1, ans in zip(t["feats"], t["top1"], t["answer"])]
        except (SafetensorError, KeyError, ValueError) as e:
            print(f"warning: rebuilding the unreadable cache file {path} ({type(e).__name__}: {e})", file=sys.stderr)
    out = [trace(model, ids, ans, v) for (ids, ans, _), v in zip(encoded, vocabs)]
    with atomic_file(path) as tmp:
        save_file({"feats": torch.stack([t.feats for t in out]), "top1": torch.tensor([t.top1 for t in out]),
                   "answer": torch.tensor([t.answer for t in out])}, str(tmp))
    return out


def wall_clock(model, encoded, clf, vocab_of):
    """AdaInfer's time over the full forward's, summed over the prompts; the two take turns
    on each prompt, one run each. None when there is nothing to time (--time-n 0)."""
    return wall_clock_ratios(model, encoded, {"clf": clf}, vocab_of, runs=1, warmup=0).get("clf")


def wall_clock_ratios(model, encoded, rules, vocab_of, runs, warmup=1):
    """{rule: AdaInfer's time over the full forward's, summed over the prompts}: on each prompt the
    full forward and every rule take turns (medians of `runs`); {} when there is nothing to time."""
    if not encoded:
        return {}
    fns = []
    for ids, _, choices in encoded:
        fns.append(lambda ids=ids: model(torch.tensor([ids], device=model.device), last_only=True))
        fns += [lambda ids=ids, clf=clf, choices=choices: predict(model, ids, clf, vocab_of(choices))
                for clf in rules.values()]
    ms = np.array(interleaved_ms(fns, runs, warmup=warmup)).reshape(len(encoded), 1 + len(rules)).sum(0)
    return {label: float(ms[1 + i] / ms[0]) for i, label in enumerate(rules)}


@command
@torch.no_grad()  # restores the grad mode on return: main may run inside a test
def main(argv=None):
    ap = parser(__doc__, threads=torch.get_num_threads())
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--shots", type=int, nargs="+", default=[0], help="for every task without its own ':k'")
    ap.add_argument("--modes", nargs="+", default=["full", "choices"], choices=["full", "choices"])
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--time-n", type=int, default=10, help="test prompts timed live (0: none)")
    ap.add_argument("--rule", default="gold", choices=LABEL_RULES)
    ap.add_argument("--features", nargs="+", default=list(DEFAULT_FEATURES), choices=FEATURES)
    ap.add_argument("--tau", type=float, default=0.8, help="the gap threshold baseline (paper: 0.8)")
    ap.add_argument("--transfer-model", type=Path,
                    help="also apply each SVM fitted here to this model's traces of the same test prompts")
    a = ap.parse_args(argv)
    if not (a.n_train >= 1 and a.n_test >= 1 and a.time_n >= 0 and 0 <= a.tau <= 1 and a.threads >= 1
            and min(a.shots) >= 0):
        ap.error("need --n-train, --n-test, --threads >= 1, --time-n >= 0, --shots >= 0 and 0 <= --tau <= 1")
    # "antonym:5" runs that task with 5 shots only, "squad:0,5" with 0 and 5
    configs = []
    for t in a.tasks:
        name, colon, k = t.partition(":")
        known = name in TASKS or name.endswith(".jsonl") and Path(name).is_file()
        if not known or (colon and not all(x.isdigit() for x in k.split(","))):
            ap.error(f"--tasks {t!r}: need one of {', '.join(TASKS)} or an existing .jsonl file, "
                     "optionally :SHOTS[,SHOTS]")
        configs += [(name, shots, m) for shots in ([int(x) for x in k.split(",")] if k else a.shots) for m in a.modes]
    writable_folder(a.out)
    # every task read and encoded before the model loads, so that bad input ends the run at once
    tok = load_tokenizer(a.model)
    tasks = {name: load_task(name, a.n_train, a.n_test) for name in dict.fromkeys(c[0] for c in configs)}
    encoded = {}
    for name, k, _ in configs:
        task = tasks[name]
        if k > len(task.train):
            raise ValueError(f"--tasks {name}: {k} shots need {k} train instances, it has {len(task.train)}")
        if (name, k) not in encoded:
            encoded[name, k] = {s: [encode(tok, task.with_shots(i, k, seed=j)) for j, i in enumerate(getattr(task, s))]
                                for s in ("train", "test")}
    model = start(a, tokenizer=False)
    other = load_model(a.transfer_model, a.dtype, device=a.device) if a.transfer_model else None
    tag = cache_key(a.model, [], *device_tag(model))
    other_tag = a.transfer_model and cache_key(a.transfer_model, [], *device_tag(model))
    cfg = model.cfg
    results, skipped, store, bar = [], [], {}, tqdm(total=len(configs), desc="adainfer")
    for name, k, mode in configs:
        task, enc = tasks[name], encoded[name, k]
        if mode == "choices" and task.test[0].choices is None:  # scored over the full vocabulary, once
            if "full" in a.modes:
                bar.update()
                continue
            mode = "full"
        longest = max(len(ids) for split in enc.values() for ids, _, _ in split)
        if longest > cfg.max_seq_len:
            skipped.append(f"{name} k={k} {mode}: a prompt of {longest} tokens exceeds the context of {cfg.max_seq_len}")
            bar.update()
            continue
        vocab_of = (lambda c: None) if mode == "full" else (lambda c: torch.tensor(c))
        V = None if mode == "full" else len(task.test[0].choices)
        traces = {s: traces_of(model, tag, enc[s], vocab_of) for s in enc}
        lengths = [len(ids) for ids, _, _ in enc["test"]]
        rules = {"threshold": Threshold(a.tau), "oracle": "oracle"}
        for cls_name, cls in (("svm", SVM), ("crf", CRFClassifier)):
            try:
                rules[cls_name] = cls(a.features).fit(traces["train"], a.rule)
            except ValueError as e:  # e.g. no layer ever right on the train split
                print(f"\n{name} k={k} {mode}: {cls_name} not fitted: {e}")
        row = {"task": name, "shots": k, "mode": mode, "n_train": len(traces["train"]), "n_test": len(lengths),
               "full_accuracy": float(np.mean([t.top1[-1] == t.answer for t in traces["test"]]))}
        for rname, rule in rules.items():
            row[rname] = simulate(rule, traces["test"], lengths, cfg, V)
            if rname != "oracle":
                row[rname]["wall_clock_ratio"] = wall_clock(model, enc["test"][:a.time_n], rule, vocab_of)
        row["sweep"] = [(tau, simulate(Threshold(tau), traces["test"], lengths, cfg, V)) for tau in np.linspace(0, 1, 11)]
        if other is not None and "svm" in rules:  # cross-model: this model's SVM on the other's features
            theirs = traces_of(other, other_tag, enc["test"], vocab_of)
            row["transfer"] = {"model": str(a.transfer_model), "svm": simulate(rules["svm"], theirs, lengths, cfg, V),
                               "full_accuracy": float(np.mean([t.top1[-1] == t.answer for t in theirs])),
                               "oracle": simulate("oracle", theirs, lengths, cfg, V)}
        results.append(row)
        store[(name, k, mode)] = (traces, lengths, V, rules)
        bar.set_postfix(task=name, k=k, mode=mode, refresh=False)
        bar.update()
    bar.close()
    cross = cross_task(store, cfg, a.shots[0], a.features, a.rule)
    res = {"model": str(a.model), "args": settings(a), "results": results,
           "skipped": skipped, "cross_task": cross}
    publish(a.out, "adainfer", res, "\n\n".join([
        table(results, a.tau), *(["Not run: " + "; ".join(skipped)] if skipped else []), cross_table(cross, a.shots[0]),
        *([transfer_table(results)] if other is not None else [])]))
    if results:
        plots(results, a.out, cfg.n_layers)


QA = ("csqa", "mmlu", "squad")


def cross_task(store, cfg, k, features, rule):
    """SVM fitted on one task (k shots; each task in the scoring mode the grid ran, the choices
    where it ran both), applied to every other task; and one fitted on the QA tasks together,
    applied to the others (the paper's QA -> classification)."""
    modes = {}
    for name, shots, mode in store:
        if shots == k and "svm" in store[(name, shots, mode)][3] and modes.get(name) != "choices":
            modes[name] = mode
    keys = [(name, k, mode) for name, mode in modes.items()]
    sources = {src[0]: store[src][3]["svm"] for src in keys}
    qa = [store[key][0]["train"] for key in keys if key[0] in QA]
    if len(qa) > 1:
        try:
            sources["+".join(key[0] for key in keys if key[0] in QA)] = SVM(features).fit(sum(qa, []), rule)
        except ValueError:
            pass
    out = {}
    for src, svm in sources.items():
        for dst in keys:
            traces, lengths, V, _ = store[dst]
            out[f"{src}->{dst[0]}"] = {m: v for m, v in simulate(svm, traces["test"], lengths, cfg, V).items()
                                       if m != "exits"}
    return out


def acc_flops(s):
    """A rule's accuracy (%) / FLOPs ratio, one cell."""
    return f"{100 * s['accuracy']:.1f} / {s['flops_ratio']:.2f}"


def transfer_table(results):
    rows = [[r["task"], r["shots"], r["mode"], 100 * r["transfer"]["full_accuracy"], acc_flops(r["transfer"]["svm"]),
             acc_flops(r["transfer"]["oracle"])] for r in results if "transfer" in r]
    return ("Cross-model: the SVM fitted on this model's traces, applied to the other model's (accuracy / FLOPs ratio)"
            "\n\n" + markdown_table(rows, ["task", "shots", "scoring", "other model full acc", "SVM from this model",
                                           "oracle"], floatfmt=".1f"))


def table(results, tau):
    def cell(s):  # accuracy / FLOPs / layers / wall-clock ratio of one stop rule
        if s is None:
            return "not fitted"
        wall = "-" if s["wall_clock_ratio"] is None else f"{s['wall_clock_ratio']:.2f}"
        return f"{acc_flops(s)} / {s['layers_ratio']:.2f} / {wall}"
    rows = [[r["task"], r["shots"], r["mode"], 100 * r["full_accuracy"],
             *(cell(r.get(k)) for k in ("svm", "crf", "threshold")), acc_flops(r["oracle"])] for r in results]
    return markdown_table(rows, ["task", "shots", "scoring", "full acc", "SVM acc / FLOPs / layers / wall",
                                 "CRF acc / FLOPs / layers / wall", f"gap>={tau} acc / FLOPs / layers / wall",
                                 "oracle acc / FLOPs"], floatfmt=".1f")


def cross_table(cross, k):
    if not cross:
        return f"Cross-task: no SVM was fitted at {k} shots, so there is nothing to transfer."
    sources = list(dict.fromkeys(key.split("->")[0] for key in cross))
    tasks = list(dict.fromkeys(key.split("->")[1] for key in cross))
    rows = [[s, *(acc_flops(cross[f"{s}->{d}"]) for d in tasks)] for s in sources]
    return ("SVM trained on (row) applied to (column): accuracy / FLOPs ratio\n\n"
            + markdown_table(rows, ["trained on", *tasks]))


def plots(results, out, n_layers):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs = [s["flops_ratio"] for _, s in r["sweep"]]
        ys = [100 * s["accuracy"] for _, s in r["sweep"]]
        ax.plot(xs, ys, marker=".", label=f"{r['task']} k={r['shots']} {r['mode']}")
    ax.set_xlabel("FLOPs ratio (AdaInfer / full), gap threshold swept 0..1")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "adainfer-sweep.png", dpi=110)
    cols = min(5, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, results):
        rule = "svm" if "svm" in r else "threshold"
        ax.hist(r[rule]["exits"], bins=range(0, n_layers + 1), color="tab:blue")
        ax.set_title(f"{r['task']} k={r['shots']}\n{r['mode']} ({rule})", fontsize=7)
        ax.set_xlabel("exit layer", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "adainfer-exits.png", dpi=110)


if __name__ == "__main__":
    main()
