"""Every benchmark of the project in one run: the decoder against transformers, AdaInfer on
the classification tasks and in generation, Unified Layer Skipping with its baselines,
Kangaroo on Spec-Bench, every layer-skipping and early-exit decoder against its cost model, and
the matrix products of few rows; then one combined JSON, one markdown report and one summary figure.

python -m skip.harness.bench [--quick] [--parts decoder adainfer ...] [--summary-only]
--quick takes small samples (about 10 minutes on 2 CPU cores) and writes to runs/quick/; the
full run (about an hour) uses the settings behind the README's tables and writes to
runs/. --summary-only rebuilds bench.json, bench.md and summary.png from the parts' JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from model import add_load_args
from model.files import write_text_atomic

from .. import RUNS
from .bench_decoder import table as decoder_table

# part: (module, output JSON, markdown, arguments of the full run, added for the quick run)
PARTS = {
    "decoder": ("skip.harness.bench_decoder", "bench-decoder.json", None, ["--runs", "7"], ["--runs", "2"]),
    "adainfer": ("skip.harness.eval_adainfer", "adainfer.json", "adainfer.md",
                 ["--tasks", "sst2", "csqa", "mmlu", "squad", "antonym:5", "next_letter:5", "last_initial:5",
                  "--n-train", "40", "--n-test", "40", "--time-n", "8"],
                 ["--tasks", "sst2", "csqa", "antonym:5", "--n-train", "30", "--n-test", "30", "--time-n", "4"]),
    "adainfer-gen": ("skip.harness.eval_adainfer_gen", "adainfer-gen.json", "adainfer-gen.md", [],
                     ["--n-train", "4", "--n-test", "6", "--max-new", "24"]),
    "skipping": ("skip.harness.bench_skipping", "bench-skipping.json", "bench-skipping.md", [],
                 ["--r", "2", "3", "--n-quality", "2", "--n-heldout", "4", "--max-new", "24", "--batches", "1", "8",
                  "--runs", "1"]),
    "kangaroo": ("skip.harness.bench_kangaroo", "bench-kangaroo.json", "bench-kangaroo.md", [],
                 ["--per-category", "1", "--max-new-tokens", "48", "--repeats", "1", "--no-sweep"]),
    "cost": ("skip.harness.bench_cost", "bench-cost.json", "bench-cost.md", [],
             ["--per-category", "1", "--max-new-tokens", "24", "--repeats", "1"]),
    "products": ("skip.harness.bench_products", "bench-products.json", "bench-products.md", [],
                 ["--rows", "1", "2", "4", "8", "--runs", "3"]),
}
TITLES = {"decoder": "Decoder against transformers", "adainfer": "AdaInfer, next-token tasks",
          "adainfer-gen": "AdaInfer in generation", "skipping": "Unified Layer Skipping and its baselines",
          "kangaroo": "Kangaroo on Spec-Bench", "cost": "Layer skipping and early exits against their cost models",
          "products": "Matrix products of 1-16 rows"}


def run_part(name, quick, out, device="cpu", dtype="float32", model=None):
    import importlib
    module, js, _, full, small = PARTS[name]
    argv = full + (small if quick else [])
    argv += ["--out", str(out / js if name == "decoder" else out), "--device", device, "--dtype", dtype]
    argv += [] if model is None else ["--model", str(model)]
    print(f"\n=== {name}: python -m {module} {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    importlib.import_module(module).main(argv)
    return {"argv": argv, "seconds": time.perf_counter() - t0}


def points(results):
    """(method, setting, quality kept, FLOPs ratio, wall-clock speedup) from the parts' results.
    Quality kept: task accuracy over the full model's (AdaInfer on the tasks, tasks the full
    model never gets right left out); the share of generated tokens equal to the full model's
    (AdaInfer in generation); next-token agreement with the full model on held-out text (layer
    skipping); 1.0 when every output equals plain greedy decoding, else 0 (Kangaroo)."""
    out = []
    if "adainfer" in results:
        rows = [r for r in results["adainfer"]["results"] if r["full_accuracy"] > 0]
        full = sum(r["full_accuracy"] for r in rows)
        tau = results["adainfer"]["args"]["tau"]
        for rule, label in (("svm", "SVM"), ("crf", "CRF"), ("threshold", f"gap>={tau}")):
            have = [r for r in rows if rule in r]
            if have:
                out.append(("AdaInfer (tasks)", label, sum(r[rule]["accuracy"] for r in have) / full,
                            sum(r[rule]["flops_ratio"] for r in have) / len(have),
                            len(have) / sum(r[rule]["wall_clock_ratio"] for r in have)))
    for r in results.get("adainfer-gen", {}).get("results", []):
        out.append(("AdaInfer (generation)", f"{r['rule']} every {r['check_every']}, {r['head']}, {r['fill']}",
                    r["token_match"], r["flops_ratio"], 1 / r["wall_clock_ratio"]))
    rows = results.get("skipping", {}).get("rows", [])
    for r in rows[1:]:
        t = r["throughput"]["1"]
        out.append((r["name"] + (" (fine-tuned)" if r["fine_tuned"] else ""), f"{r['r']}x", r["agreement"],
                    1 / t["flops_ceiling"], t["speedup"]))
    if "kangaroo" in results:
        o = results["kangaroo"]["categories"]["overall"]
        for m in ("kangaroo", next(k for k in o if k.startswith("kangaroo-")), "lens"):
            out.append(("Kangaroo" if m != "lens" else "lens draft (no adapter)", m, float(o[m]["lossless"]),
                        o[m]["flops_per_token"] / o["plain"]["flops_per_token"], o[m]["speedup"]))
    return out


def summary_table(pts):
    lines = ["| method | setting | quality kept | FLOPs ratio | wall-clock speedup |", "|---|---|---:|---:|---:|"]
    lines += [f"| {m} | {s} | {q:.3f} | {f:.2f} | {w:.2f}x |" for m, s, q, f, w in pts]
    return "\n".join(lines)


def plot(pts, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    methods = list(dict.fromkeys(m for m, *_ in pts))
    markers = dict(zip(methods, "os^vDP*Xh<>"))
    for ax, col, xlabel in ((axes[0], 3, "FLOPs per token / full model's (left of 1 = compute saved)"),
                            (axes[1], 4, "measured wall-clock speedup (batch 1)")):
        for m in methods:
            mine = sorted((p for p in pts if p[0] == m), key=lambda p: p[col])
            curve = all(p[1].endswith("x") for p in mine)  # one method over target speedups
            ax.plot([p[col] for p in mine], [p[2] for p in mine], markers[m], linestyle="-" if curve else "",
                    label=m, alpha=0.8)
            for i, p in enumerate(mine):
                if m != "AdaInfer (generation)":  # six settings in one spot: the table names them
                    ax.annotate(p[1], (p[col], p[2]), fontsize=6, xytext=(3, 2 + 7 * (i % 2)),
                                textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([0.25, 0.5, 1, 2, 4])
        ax.axvline(1.0, color="grey", lw=0.6)
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("quality kept (accuracy or next-token agreement vs the full model)")
    if axes[1].get_legend_handles_labels()[0]:  # a run of parts without a method has no points
        axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle("SmolLM2-135M on 2 CPU cores: quality kept against compute saved")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small samples, about 10 minutes")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--summary-only", action="store_true", help="only combine the parts' existing JSON")
    ap.add_argument("--out", type=Path, help="default: runs/quick with --quick, else runs")
    ap.add_argument("--model", type=Path, help="default: each part's (SmolLM2)")
    add_load_args(ap)  # passed on to every part, with --model
    a = ap.parse_args(argv)
    out = a.out or RUNS / ("quick" if a.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    timing = {name: run_part(name, a.quick, out, a.device, a.dtype, a.model) for name in ([] if a.summary_only else a.parts)}
    if (out / "bench.json").exists():  # keep the record of parts run before
        timing = {**json.loads((out / "bench.json").read_text())["timing"], **timing}
    results = {n: json.loads((out / PARTS[n][1]).read_text()) for n in a.parts if (out / PARTS[n][1]).exists()}
    if not results:
        raise SystemExit(f"no benchmark results in {out}; run without --summary-only first")
    pts = points(results)
    combined = {"quick": a.quick, "timing": timing, "summary": [dict(zip(("method", "setting", "quality_kept",
                "flops_ratio", "speedup"), p)) for p in pts], "parts": results}
    write_text_atomic(out / "bench.json", json.dumps(combined, indent=1))
    md = [f"# Benchmarks ({'quick' if a.quick else 'full'} run)", "", "## Summary", "", summary_table(pts)]
    for name in results:
        text = decoder_table(results[name]) if name == "decoder" else (out / PARTS[name][2]).read_text()
        secs = f" ({timing[name]['seconds'] / 60:.1f} min)" if name in timing else ""
        md += ["", f"## {TITLES[name]}{secs}", "", text.strip()]
    write_text_atomic(out / "bench.md", "\n".join(md) + "\n")
    plot(pts, out / "summary.png")
    print("\n".join(md))
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'summary.png'}")


if __name__ == "__main__":
    main()
