"""`show`: a trace (skip/trace/format.py) as a picture of what the method ran: one column per pass of a
token over the layers (x: the prompt, then the decode slots in the order they ran), one row per
layer (layer 0 at the bottom), each cell coloured by what happened to that layer there:
    ran        the layer ran (every layer of the prompt pass, the full model's every layer)
    skipped    not run and no keys/values written (Unified's dropped layers, SkipDecode's middle)
    exit       AdaInfer's stop: the last layer the token ran
    filled     above an AdaInfer exit: keys/values written from the exited state (state
               propagation). Traces do not record fills; skip.trace runs AdaInfer with
               fill="propagate", which fills every layer above the exit, so they are inferred.
    draft / verified / rejected   Kangaroo: a round runs M^s (layers [0, l)) on x and each draft,
               then layers [l, L) once over all of them; the rejected drafts' slots are cropped and
               run again by the next round, so they get their own columns.
The cells come from the trace's layer_runs (what the decoder ran), the decisions (exits, rounds,
acceptances) from its steps; `cells` checks that the two agree. A trace without layer_runs (a
port's) is drawn from its steps alone, the layers each pass ran inferred from the method's rule
(inferred_runs; the title says so). With a second trace, the first divergence that `compare`
finds (skip/compare.findings) is boxed.

python -m skip.trace show DIR [--against OTHER] [--out FILE.png] [--model MODEL_DIR]
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import is_int
from model.jsonfile import read_json

from .check import read
from .compare import findings
from .format import TraceError
RAN, SKIPPED, EXIT, FILLED, DRAFT, VERIFIED, REJECTED = range(1, 8)  # cell states
COLORS = {RAN: "#4c72b0", SKIPPED: "#e8e8e8", EXIT: "#dd8452", FILLED: "#f3dc9b", DRAFT: "#55a868",
          VERIFIED: "#8172b3", REJECTED: "#e0a0a0"}
LEGEND = {RAN: "ran", SKIPPED: "skipped (not run, no keys/values)",
          EXIT: "exit: the last layer run (the stop rule fired there)",
          FILLED: "filled: K/V from the exited state (state propagation;\nnot recorded, inferred: AdaInfer fills "
                  "every layer above its exit)",
          DRAFT: "draft phase: M^s = layers [0, l) on x and each draft",
          VERIFIED: "verification: layers [l, L) once over x and the drafts",
          REJECTED: "rejected draft (ran, then cropped; its slot runs again)"}


@dataclass
class Grid:
    states: np.ndarray  # (L, C) int: the state of layer i (row) in column c; column 0 is the whole prompt
    slots: list  # (C,) the slot each column ran at (None for the prompt)
    fed: list  # (C,) the token id fed in at each column (None for the prompt)
    run_columns: list  # per layer run of the trace: the column of each slot it ran
    rounds: list = field(default_factory=list)  # Kangaroo: per round, its columns (x first, then the drafts)
    l: int | None = None  # Kangaroo: the exit layer of the draft model M^s


def inferred_runs(meta):
    """The layer runs a trace's steps imply, for a trace that records none: every layer over the
    prompt, then per pass of a fed-back token the method's layers (full: all; unified: the kept
    ones; skipdecode: its schedule's, skip/baselines.py; adainfer: up to the exit; kangaroo: per
    round [0, l) on x and on each draft, then [l, L) over all of them). Norms are not known: 0."""
    from ..baselines import WARMUP, skipdecode_layers
    L, T, steps, tokens = meta["model"]["n_layers"], len(meta["prompt"]), meta["steps"], meta["tokens"]
    need = {"unified": {"kept_layers"}, "skipdecode": {"schedule"}, "adainfer": {"exit_layer"},
            "kangaroo": {"drafted", "accepted"}}.get(meta["method"], set())
    fed = len(tokens) - 1  # passes of tokens fed back
    if need and steps and not need <= set(steps[0]) or need and not steps and fed > 0 and meta["method"] in (
            "unified", "skipdecode"):
        raise TraceError(f"the trace has no layer_runs and its {meta['method']} steps lack "
                         f"{sorted(need - set(steps[0] if steps else ()))}, so nothing to draw")
    if meta["method"] == "adainfer" and len(steps) != fed:
        raise TraceError(f"{len(tokens)} tokens but {len(steps)} AdaInfer steps (one per token fed back)")
    if meta["method"] == "unified" and fed and not all(is_int(i) and 0 <= i < L for i in steps[0]["kept_layers"]):
        raise TraceError(f"kept_layers {steps[0]['kept_layers']!r:.60}: layer indices in [0, {L})")
    if meta["method"] == "skipdecode" and fed and not (steps[0]["schedule"] and all(
            is_int(n) and WARMUP < n <= L for n in steps[0]["schedule"])):
        raise TraceError(f"schedule {steps[0]['schedule']!r:.60}: layer counts in ({WARMUP}, {L}]")
    runs = [[0, i, [0.0] * T] for i in range(L)]
    if meta["method"] == "kangaroo":
        l = exit_layer(meta["settings"], L)
        if l is None:
            raise TraceError("the trace has no layer_runs and names no exit layer l (settings l or an adapter)")
        n = T
        for st in steps:
            runs += [[n + i, layer, [0.0]] for i in range(st["drafted"] + 1) for layer in range(l)]
            runs += [[n, layer, [0.0] * (st["drafted"] + 1)] for layer in range(l, L)]
            n += st["accepted"] + 1
        return runs
    for s in range(len(tokens) - 1):  # the passes of tokens fed back
        layers = {"unified": lambda: steps[0]["kept_layers"],
                  "skipdecode": lambda: skipdecode_layers(L, steps[0]["schedule"], s),
                  "adainfer": lambda: range(steps[s]["exit_layer"] + 1)}.get(meta["method"], lambda: range(L))()
        runs += [[T + s, layer, [0.0]] for layer in layers]
    return runs


def cells(meta):
    """The grid of a trace's metadata (trace.json): which state each layer is in at each pass."""
    L, T, runs = meta["model"]["n_layers"], len(meta["prompt"]), meta.get("layer_runs") or inferred_runs(meta)
    meta = {**meta, "layer_runs": runs}  # recorded or inferred, once: kangaroo_rounds reads them too
    layers, slots, latest, run_columns = [set()], [None], {}, []
    for slot, layer, norms in runs:
        where = []
        for s in range(slot, slot + len(norms)):
            c = 0 if s < T else latest.get(s)
            if c is None or (c > 0 and layer in layers[c]):  # a slot that runs a layer again: a new pass
                c = latest[s] = len(layers)
                layers.append(set())
                slots.append(s)
            layers[c].add(layer)
            where.append(c)
        run_columns.append(where)
    states = np.full((L, len(layers)), SKIPPED)
    for c, ran in enumerate(layers):
        states[sorted(ran), c] = RAN
    tokens = meta["tokens"]
    fed = [None] + [tokens[s - T] if s - T < len(tokens) else None for s in slots[1:]]
    grid = Grid(states, slots, fed, run_columns)
    need = {"adainfer": {"exit_layer"}, "kangaroo": {"drafted", "accepted", "drafts"}}.get(meta["method"], set())
    if meta["steps"] and not need <= set(meta["steps"][0]):  # a port's trace may record fewer keys than ours
        raise TraceError(f"the {meta['method']} steps lack {sorted(need - set(meta['steps'][0]))}, so nothing to draw")
    if meta["method"] == "adainfer":
        exits(grid, meta["steps"], L)
    elif meta["method"] == "kangaroo":
        kangaroo_rounds(grid, meta, T)
    return grid


def exits(grid, steps, L):
    """AdaInfer: step s fed generated token s back, ran layers [0, exit_layer] and filled the rest."""
    if len(steps) != len(grid.slots) - 1:
        raise TraceError(f"{len(steps)} AdaInfer steps but {len(grid.slots) - 1} passes in the layer runs")
    for c, st in enumerate(steps, 1):
        e = st["exit_layer"]
        if list(np.flatnonzero(grid.states[:, c] == RAN)) != list(range(e + 1)):
            raise TraceError(f"step {c - 1} exits at layer {e}, the layer runs of slot {grid.slots[c]} disagree")
        if e < L - 1:
            grid.states[e, c], grid.states[e + 1:, c] = EXIT, FILLED


def kangaroo_rounds(grid, meta, T):
    """Kangaroo: round s is drafted + 1 passes (x, d_1..d_k) at consecutive slots; the first
    accepted + 1 are kept, the others rejected. l is where a verification run starts: the first
    run over several decode slots, else the adapter's own record."""
    c, n = 1, T  # the next round's first column and the slot of its x
    for st in meta["steps"]:
        cols = list(range(c, c + st["drafted"] + 1))
        if cols[-1] >= len(grid.slots) or [grid.slots[i] for i in cols] != list(range(n, n + len(cols))):
            raise TraceError(f"round {len(grid.rounds)} drafted {st['drafted']} from slot {n}, the layer runs disagree")
        c, n = cols[-1] + 1, n + st["accepted"] + 1
        grid.rounds.append(cols)
        for i, draft in zip(cols[1:], st["drafts"]):
            grid.fed[i] = draft
        grid.states[:, cols[st["accepted"] + 1:]] = np.where(grid.states[:, cols[st["accepted"] + 1:]] == RAN,
                                                             REJECTED, SKIPPED)
    if c != len(grid.slots):
        raise TraceError(f"the rounds hold {c - 1} passes, the layer runs {len(grid.slots) - 1}")
    grid.l = next((layer for slot, layer, norms in meta["layer_runs"] if slot >= T and len(norms) > 1), None)
    if grid.l is None:  # every round drafted nothing: no run shows l
        grid.l = exit_layer(meta["settings"], len(grid.states))
    if grid.l is not None:
        kept = grid.states[:, 1:] == RAN
        grid.states[:, 1:][kept & (np.arange(len(grid.states))[:, None] < grid.l)] = DRAFT
        grid.states[:, 1:][kept & (np.arange(len(grid.states))[:, None] >= grid.l)] = VERIFIED


def exit_layer(settings, L):
    """Kangaroo's exit layer l as a trace's settings give it: l itself (adapter-free), else what the
    adapter folder's adapter.json records; None where neither does (drawn without l)."""
    l = settings.get("l")
    if is_int(l) and 0 < l < L:
        return l
    try:
        l = read_json(Path(settings.get("adapter")) / "adapter.json", "adapter record", 1 << 20)["l"]
    except (TypeError, OSError, ValueError, KeyError, IndexError):
        return None
    return l if is_int(l) and 0 < l < L else None


def divergence(grid, meta, finding):
    """The cells a Finding names: (layer or None for the whole column, first column, last column), or None."""
    T = len(meta["prompt"])
    if finding.run is not None:
        c = grid.run_columns[finding.run[0]][finding.run[1]]
        return finding.layer, c, c
    if finding.prompt:
        return finding.layer, 0, 0
    if finding.token is not None and T + finding.token in grid.slots:  # the pass the token was fed to
        c = len(grid.slots) - 1 - grid.slots[::-1].index(T + finding.token)
        return None, c, c
    if finding.step is not None and grid.rounds:
        return None, grid.rounds[finding.step][0], grid.rounds[finding.step][-1]
    if finding.step is not None and meta["method"] == "adainfer":
        return None, finding.step + 1, finding.step + 1
    return None


def label(tok, token_id):
    if token_id is None:
        return ""
    if tok is None:
        return str(token_id)
    text = tok.decode([token_id]).replace("\n", "\\n").replace(" ", "\u2423")  # a visible space
    return text if len(text) <= 10 else text[:9] + "\u2026"


def setting(k, v):
    """One setting as the title shows it: a path by its name, a classifier by its kind and features,
    a cheap head by its size (their parameters and ids are in trace.json)."""
    if k == "adapter":
        return f"{k} {Path(str(v)).name}"
    if k == "classifier" and isinstance(v, dict) and isinstance(v.get("features"), list):
        return f"{v.get('kind')} on {', '.join(map(str, v['features']))}"
    if k == "vocab" and isinstance(v, list):
        return f"cheap head of {len(v)} tokens"
    return f"{k} {v}"


def title(meta, grid):
    shown = ", ".join(setting(k, v) for k, v in meta["settings"].items())
    m = meta["model"]
    return (f"{meta['method']}" + (f" ({shown})" if shown else "") + f": {len(meta['tokens'])} tokens generated\n"
            f"model: {m['n_layers']} layers, d {m['dim']}, {meta.get('dtype', 'float32')}; "
            f"prompt: {len(meta['prompt'])} tokens" + (f"; draft exit l = {grid.l}" if grid.l is not None else "")
            + ("" if meta.get("layer_runs") else "; layers inferred from the steps (no layer_runs)"))


def draw(grid, meta, out, tok=None, mark=None, words=None):
    """Save the picture of grid to out (PNG); mark: divergence()'s cells, words: its finding."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    L, C = grid.states.shape
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 + 0.24 * C), 2.9 + max(1.2, 0.15 * L)))
    rgb = np.array([matplotlib.colors.to_rgb(COLORS[int(v)]) for v in grid.states.flat]).reshape(L, C, 3)
    ax.imshow(rgb, origin="lower", aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(C) - 0.5, minor=True)
    ax.set_yticks(np.arange(L) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.axvline(0.5, color="white", linewidth=4)  # the prompt column apart from the decode passes
    ax.set_xticks(range(C), ["prompt"] + [label(tok, t) for t in grid.fed[1:]], rotation=90, fontsize=7)
    for c, text in enumerate(ax.get_xticklabels()):  # a rejected draft's token in the colour of its cells
        if (grid.states[:, c] == REJECTED).any():
            text.set_color("#a03030")
    ax.set_yticks(range(L), [str(i) if L <= 32 or i % 2 == 0 else "" for i in range(L)], fontsize=6)
    ax.set_ylabel("layer")
    ax.set_xlabel("the token fed in at each pass, in the order they ran"
                  + (" (ids)" if tok is None else " (\u2423 = a space)"), fontsize=8)
    for r, cols in enumerate(grid.rounds):  # Kangaroo's rounds, side by side
        ax.axvline(cols[0] - 0.5, color="black", linewidth=0.8)
        ax.text((cols[0] + cols[-1]) / 2, 1.005, f"r{r}", ha="center", va="bottom", fontsize=7,
                transform=ax.get_xaxis_transform())
    if grid.l is not None:
        ax.axhline(grid.l - 0.5, color="black", linewidth=0.8, linestyle="--")
    present = [s for s in LEGEND if (grid.states == s).any()]
    handles = [Patch(facecolor=COLORS[s], edgecolor="grey", label=LEGEND[s]) for s in present]
    if grid.rounds:
        handles.append(Patch(facecolor="none", edgecolor="black", label="r0, r1, ...: Kangaroo's rounds, each "
                             "the last accepted token x, then its drafts; dashed line: l"))
    if mark is not None:
        layer, c0, c1 = mark
        y0, h = (-0.5, L) if layer is None else (layer - 0.5, 1)
        for color, width in (("black", 3.5), ("white", 1.2)):  # seen on every cell colour
            ax.add_patch(Rectangle((c0 - 0.5, y0), c1 - c0 + 1, h, fill=False, edgecolor=color, linewidth=width))
        for c in range(c0, c1 + 1):
            ax.get_xticklabels()[c].set_fontweight("bold")
        handles.append(Patch(facecolor="none", edgecolor="black", linewidth=2.5, label="first divergence"))
    if words:
        handles.append(Patch(facecolor="none", edgecolor="none", label="\n".join(textwrap.wrap(words, 70))))
    ax.set_title(title(meta, grid), fontsize=9, loc="left", pad=16 if grid.rounds else 6)
    fig.tight_layout()
    fig.canvas.draw()  # the legend goes under the tick labels, whatever their length
    below = ax.get_tightbbox(fig.canvas.get_renderer()).transformed(ax.transAxes.inverted()).y0
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, below - 0.01), fontsize=7, frameon=False)
    from weights.files import atomic_file
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")  # about 50 KB
    plt.close(fig)


PNG = b"\x89PNG\r\n\x1a\n"  # what a PNG file starts with


def show(path, against=None, out=None, model=None):
    """Draw the trace in directory path to out (default path/trace.png); against: a second trace
    whose first divergence from this one is marked; model: a model directory whose tokenizer
    turns the token ids into text. Returns out."""
    try:
        import matplotlib  # noqa: F401  (an optional extra)
    except ImportError:
        raise TraceError("show needs matplotlib: pip install -e '.[bench]'") from None
    meta, _ = read(path)
    grid, mark, words = cells(meta), None, None
    if against is not None:
        found = findings(path, against)
        words = f"against {against}: " + ("the traces agree within the tolerances" if not found else found[0].words)
        for f in found:  # the first divergence that names a place in the picture
            if (mark := divergence(grid, meta, f)) is not None:
                words = f"against {against}: {f.words}"
                break
    tok = None
    if model is not None:
        from tokenizer import load_tokenizer
        try:
            tok = load_tokenizer(model)
        except OSError as e:
            raise TraceError(f"--model {model}: {e}") from e
    out = Path(path) / "trace.png" if out is None else Path(out)
    draw(grid, meta, out, tok, mark, words)
    return out
