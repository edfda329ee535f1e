"""Every benchmark of the project in one run: the decoder against transformers, AdaInfer on
the classification tasks and in generation, Unified Layer Skipping with its baselines,
Kangaroo on Spec-Bench, every layer-skipping and early-exit decoder against its cost model, and
the matrix products of few rows; then one combined JSON, one markdown report and one summary figure.

python -m skip.harness.bench [--quick] [--parts decoder adainfer ...] [--summary-only]
--quick takes small samples (about 10 minutes on 2 CPU cores) and writes to runs/quick/; the
full run (about an hour) uses the settings behind the README's tables and writes to
runs/. --summary-only rebuilds bench.json, bench.md and summary.png from the parts' JSON.

The summary puts every method's quality beside its speed, and names what the quality is: each
benchmark measures it its own way, so the figure has one column of panels per quality metric.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

from model import add_load_args
from model.cli import command, writable_folder
from model.jsonfile import read_json
from weights.files import write_text_atomic

from .. import RUNS
from .bench_decoder import table as decoder_table
from .report import markdown_table
from .timing import timed

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


def read_object(path):
    """A JSON file that must hold an object (a part's results, the combined record)."""
    d = read_json(path, "benchmark result")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def run_part(name, quick, out, device="cpu", dtype="float32", model=None):
    import importlib
    module, js, _, full, small = PARTS[name]
    argv = full + (small if quick else [])
    argv += ["--out", str(out / js if name == "decoder" else out), "--device", device, "--dtype", dtype]
    argv += [] if model is None else ["--model", str(model)]
    print(f"\n=== {name}: python -m {module} {' '.join(argv)}", flush=True)
    _, ms = timed(lambda: importlib.import_module(module).main(argv))
    return {"argv": argv, "seconds": ms / 1000}


# what each benchmark's quality is: each method's points share one
ACCURACY = "task accuracy kept (summed, over the full model's)"
TOKEN_MATCH = "generated tokens equal to the full model's (share)"
AGREEMENT = "next-token agreement with the full model (held-out text)"
LOSSLESS = "every output equal to plain greedy decoding (1 or 0)"


class Point(NamedTuple):
    method: str
    setting: str
    metric: str  # what quality measures: one of the names above
    quality: float
    layers: float | None  # measured layers per token (per prompt token for AdaInfer on the tasks); None: not measured
    flops_ratio: float  # FLOPs per token over the full model's
    speedup: float  # wall-clock, batch 1, against the full model in the same run


def points(results):
    """Every method's points from the parts' results. Quality: task accuracy over the full
    model's (AdaInfer on the tasks, tasks the full model never gets right left out); the share of
    generated tokens equal to the full model's (AdaInfer in generation); next-token agreement with
    the full model on held-out text (layer skipping); 1.0 when every output equals plain greedy
    decoding, else 0 (Kangaroo, which records no layers per token)."""
    out = []
    if "adainfer" in results:
        rows = [r for r in results["adainfer"]["results"] if r["full_accuracy"] > 0]
        full = sum(r["full_accuracy"] for r in rows)
        tau = results["adainfer"]["args"]["tau"]
        for rule, label in (("svm", "SVM"), ("crf", "CRF"), ("threshold", f"gap>={tau}")):
            have = [r for r in rows if rule in r]
            if have:
                out.append(Point("AdaInfer (tasks)", label, ACCURACY, sum(r[rule]["accuracy"] for r in have) / full,
                                 sum(r[rule]["avg_exit_layer"] + 1 for r in have) / len(have),
                                 sum(r[rule]["flops_ratio"] for r in have) / len(have),
                                 len(have) / sum(r[rule]["wall_clock_ratio"] for r in have)))
    for r in results.get("adainfer-gen", {}).get("results", []):
        out.append(Point("AdaInfer (generation)", f"{r['rule']} every {r['check_every']}, {r['head']}, {r['fill']}",
                         TOKEN_MATCH, r["token_match"], r["avg_layers"], r["flops_ratio"], 1 / r["wall_clock_ratio"]))
    rows = results.get("skipping", {}).get("rows", [])
    for r in rows[1:]:
        t = r["throughput"]["1"]
        out.append(Point(r["name"] + (" (fine-tuned)" if r["fine_tuned"] else ""), f"{r['r']}x", AGREEMENT,
                         r["agreement"], r["layers_per_token"], 1 / t["flops_ceiling"], t["speedup"]))
    if "kangaroo" in results:
        o = results["kangaroo"]["categories"]["overall"]
        for m in ("kangaroo", next(k for k in o if k.startswith("kangaroo-")), "lens"):
            out.append(Point("Kangaroo" if m != "lens" else "lens draft (no adapter)", m, LOSSLESS,
                             float(o[m]["lossless"]), None, o[m]["flops_per_token"] / o["plain"]["flops_per_token"],
                             o[m]["speedup"]))
    return out


def summary_table(pts):
    return markdown_table([[p.method, p.setting, p.metric, p.quality, p.layers, p.flops_ratio, f"{p.speedup:.2f}x"]
                           for p in pts],
                          ["method", "setting", "quality metric", "quality kept", "layers / token", "FLOPs ratio",
                           "wall-clock speedup"], floatfmt=("", "", "", ".3f", ".1f", ".2f", ""), right=(3, 4, 5, 6))


def plot(pts, path):
    """One column of panels per quality metric; quality against FLOPs (top) and against the
    measured speedup (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metrics = list(dict.fromkeys(p.metric for p in pts))
    fig, axes = plt.subplots(2, max(1, len(metrics)), figsize=(4.6 * max(1, len(metrics)), 8), squeeze=False)
    methods = list(dict.fromkeys(p.method for p in pts))
    markers = dict(zip(methods, "os^vDP*Xh<>"))
    for j, metric in enumerate(metrics):
        for ax, key, xlabel in ((axes[0, j], "flops_ratio", "FLOPs per token / full model's"),
                                (axes[1, j], "speedup", "measured wall-clock speedup (batch 1)")):
            for m in dict.fromkeys(p.method for p in pts if p.metric == metric):
                mine = sorted((p for p in pts if p.method == m), key=lambda p: getattr(p, key))
                curve = all(p.setting.endswith("x") for p in mine)  # one method over target speedups
                ax.plot([getattr(p, key) for p in mine], [p.quality for p in mine], markers[m],
                        linestyle="-" if curve else "", label=m, alpha=0.8)
                for i, p in enumerate(mine):
                    if m != "AdaInfer (generation)":  # six settings in one spot: the table names them
                        ax.annotate(p.setting, (getattr(p, key), p.quality), fontsize=6, xytext=(3, 2 + 7 * (i % 2)),
                                    textcoords="offset points")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xticks([0.1, 0.25, 0.5, 1, 2, 4])
            ax.axvline(1.0, color="grey", lw=0.6)
            ax.axhline(1.0, color="grey", lw=0.6)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric, fontsize=8)
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=7, loc="best")
    fig.suptitle("SmolLM2-135M on 2 CPU cores: each method's own quality against compute (top) and time (bottom)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@command
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small samples, about 10 minutes")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--summary-only", action="store_true", help="only combine the parts' existing JSON")
    ap.add_argument("--out", type=Path, help="default: runs/quick with --quick, else runs")
    ap.add_argument("--model", type=Path, help="default: each part's (SmolLM2)")
    add_load_args(ap)  # passed on to every part, with --model
    a = ap.parse_args(argv)
    out = writable_folder(a.out or RUNS / ("quick" if a.quick else ""))
    timing = {name: run_part(name, a.quick, out, a.device, a.dtype, a.model) for name in ([] if a.summary_only else a.parts)}
    try:  # the JSON read back: a file from another version of this command, or edited, is bad input
        if (out / "bench.json").exists():  # keep the record of parts run before
            timing = {**read_object(out / "bench.json")["timing"], **timing}
        results = {n: read_object(out / PARTS[n][1]) for n in a.parts if (out / PARTS[n][1]).exists()}
        if not results:
            raise ValueError(f"no benchmark results in {out}; run without --summary-only first")
        pts = points(results)
        md = [f"# Benchmarks ({'quick' if a.quick else 'full'} run)", "", "## Summary", "", summary_table(pts)]
        for name in results:
            text = decoder_table(results[name]) if name == "decoder" else (out / PARTS[name][2]).read_text()
            secs = f" ({timing[name]['seconds'] / 60:.1f} min)" if name in timing else ""
            md += ["", f"## {TITLES[name]}{secs}", "", text.strip()]
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"the JSON in {out} is not what this version writes ({type(e).__name__}: {e})") from e
    summary = [{"method": p.method, "setting": p.setting, "quality_metric": p.metric, "quality_kept": p.quality,
                "layers_per_token": p.layers, "flops_ratio": p.flops_ratio, "speedup": p.speedup} for p in pts]
    write_text_atomic(out / "bench.json", json.dumps({"quick": a.quick, "timing": timing, "summary": summary,
                                                      "parts": results}, indent=1))
    write_text_atomic(out / "bench.md", "\n".join(md) + "\n")
    plot(pts, out / "summary.png")
    print("\n".join(md))
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'summary.png'}")


if __name__ == "__main__":
    main()
