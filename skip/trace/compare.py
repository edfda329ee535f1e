"""`compare`: where two traces (skip/trace/format.py) part, in words, the first divergence first.

Both traces are checked first (skip/trace/check.py): a file that is not a trace, an unknown field
or tensor, token ids that are not integers, an empty tensor or step, or a tolerance that is not a
finite number >= 0 raises TraceError (the command's status 2), never a comparison. Then every
field and tensor is compared: the model (another model: TraceError), the prompt, the method and
its settings by meaning (defaults filled in, so an omitted setting is its default; a path by the
content of the files it names, so one adapter under two spellings is one run; a path not found
here by its spelling, with a note), the tensors within tolerances chosen
by the traces' dtypes (TOLERANCES), the logit lens's ids at every rank (rank 0 exactly; below it
two ids may swap only where their probabilities tie within the tolerance), tokens exactly, the
method's steps on the keys both traces record (a key only one records, a port's own, is named in
the notes; no key in common is a finding; integers and booleans exactly, real numbers within the
tolerance of the hidden-state norms for keys ending in _norms and of the lens probabilities for
the others: probabilities, features, AdaInfer's classifier scores), the layer runs of a method
(every layer each token ran, with its hidden-state norms) in order, so that a divergence inside
a method is named by its slot and layer, and the FLOPs exactly where both record them (null: a
port that does not count). `findings` gives the same as data (Finding: the words and where they
point), for the viewer (skip/trace/show.py). every: every differing token and step, not only the
first of each; expect: step keys whose differences the user declares expected (a peer's own
convention, e.g. a batch-wide draft cap that changes `drafted`): each is reported in the notes as
expected and every other key goes on being checked; convention: a peer's way of recording rounds
(skip/trace/convention.py), to which the reference is rewritten first.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import is_real

from .check import check_tensors, read
from .convention import apply
from .format import DTYPES, TraceError, settings_used

# compare's default (atol, rtol) per dtype (by increasing rounding error) and tensor: a value passes
# when |diff| <= atol + rtol |ref|. In fp32 per element (implementations differ by summation order);
# in fp16 and bf16 each hidden state (one layer, one position) as a vector, ||diff|| against
# ||ref||, since rounding error scales with the state, not with each element. On SmolLM2 the bf16
# states differ from the fp32 ones by up to 0.036 of their norm, fp16 by 0.0034, and the lens
# probabilities by 0.039 and 0.0047 (docs/traces.md): the defaults leave about twice that.
TOLERANCES = {
    "float32": {"hidden": (1e-4, 1e-4), "hidden_norms": (1e-4, 1e-4), "lens_probs": (1e-4, 1e-4)},
    "float16": {"hidden": (0.0, 0.01), "hidden_norms": (0.0, 0.01), "lens_probs": (0.01, 0.0)},
    "bfloat16": {"hidden": (0.0, 0.08), "hidden_norms": (0.0, 0.08), "lens_probs": (0.08, 0.0)},
}

TENSORS = {"hidden": "hidden state", "hidden_norms": "hidden-state norm", "lens_probs": "logit-lens probability"}


@dataclass
class Finding:
    """One line of compare and the place it names, where it names one."""
    words: str
    layer: int | None = None  # the layer whose output diverges (None: the embeddings, or no layer)
    prompt: bool = False  # in the prompt pass (the trace's tensors)
    run: tuple[int, int] | None = None  # (index into layer_runs, slot offset in that run)
    slot: int | None = None  # the slot of `run`
    token: int | None = None  # the generated token that differs
    step: int | None = None  # the method's step that differs


def where(name, index, n_states):
    """Words for an index into a (L+1, ...) trace tensor."""
    i = index[0]
    at = "the embeddings" if i == 0 else f"layer {i - 1}" + (" (after the final norm)" if i == n_states - 1 else "")
    rest = {"hidden": f", stored position {index[1]}", "hidden_norms": f", prompt position {index[1]}",
            "lens_probs": f", rank {index[1]}"}[name]
    return at + rest


def compare_tensor(name, ref, other, atol, rtol, per_vector=False):
    """The first divergence of one tensor, a Finding in the prompt pass, or None. Non-finite values diverge (NaN never
    passes a comparison, so the test is written as 'not within tolerance'). per_vector: compare the
    L2 norms of the difference and of ref along the last dimension."""
    if ref.shape != other.shape:
        return Finding(f"{name} has shape {tuple(other.shape)}, reference {tuple(ref.shape)}", prompt=True)
    if not bool(torch.isfinite(ref).all()):
        i = tuple(int(x) for x in (~torch.isfinite(ref)).nonzero()[0])
        return at_state(f"the reference's {name} is not finite first at {where(name, i, ref.shape[0])}", i)
    diff, size = (ref - other).abs(), ref.abs()
    if per_vector:
        diff, size = diff.norm(dim=-1), size.norm(dim=-1)
    bad = ~(diff <= atol + rtol * size)
    if not bool(bad.any()):
        return None
    i = tuple(int(x) for x in bad.nonzero()[0])
    if not bool(torch.isfinite(other[i]).all()):
        value = "not finite" if per_vector else float(other[i])
        return at_state(f"{TENSORS[name]} is {value} first at {where(name, i, ref.shape[0])}", i)
    if per_vector:
        return at_state(f"{TENSORS[name]} diverges first at {where(name, i, ref.shape[0])}: ||diff|| "
                        f"{float(diff[i]):.3g} > atol {atol} + rtol {rtol} * ||ref|| ({float(size[i]):.3g})", i)
    return at_state(f"{TENSORS[name]} diverges first at {where(name, i, ref.shape[0])}: "
                    f"max |diff| {float(diff[i[0]].max()):.3g} > atol {atol} + rtol {rtol} * |ref|", i)


def at_state(words, index):
    """A prompt-pass finding at hidden index index[0]: 0 = the embeddings, i = layer i - 1's output."""
    return Finding(words, index[0] - 1 if index[0] > 0 else None, prompt=True)


def tolerances(ref, oth, atol=None, rtol=None):
    """({tensor: (atol, rtol)}, per_vector, words) for two traces' metadata: those of the lower
    precision of the two runs (a trace without a dtype ran in float32), atol or rtol replaced
    where given; a tolerance that is not a finite number >= 0 raises TraceError."""
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and not (is_real(v) and v >= 0):
            raise TraceError(f"{name} must be a finite number >= 0, got {v!r}")
    dtype = max(ref.get("dtype", "float32"), oth.get("dtype", "float32"), key=DTYPES.index)
    tol = {name: (a if atol is None else atol, r if rtol is None else rtol) for name, (a, r) in TOLERANCES[dtype].items()}
    per_vector = dtype != "float32"
    words = "; ".join(f"{name}{' per vector' if per_vector and name == 'hidden' else ''} atol {a:g} rtol {r:g}"
                      for name, (a, r) in tol.items())
    return tol, per_vector, f"tolerances for {dtype}: {words}"


def compare_layer_runs(ref_runs, oth_runs, T, atol, rtol):
    """The first layer run (slot, layer) where two methods' runs part, a Finding, or None: one ran
    another layer or other slots, or the hidden-state norm there leaves atol + rtol |ref|."""
    def at(slot):
        return f"prompt position {slot}" if slot < T else f"slot {slot} (decode step {slot - T})"
    for r, ((sa, la, na), (sb, lb, nb)) in enumerate(zip(ref_runs, oth_runs)):
        if (sa, la, len(na)) != (sb, lb, len(nb)):
            return Finding(f"the method runs other layers first at {at(sa)}: reference layer {la} on slots "
                           f"{sa}..{sa + len(na) - 1}, other layer {lb} on slots {sb}..{sb + len(nb) - 1}",
                           la, run=(r, 0), slot=sa)
        for j, (a, b) in enumerate(zip(na, nb)):
            if not abs(a - b) <= atol + rtol * abs(a):
                return Finding(f"inside the method, the hidden state diverges first at {at(sa + j)}, layer {la}: "
                               f"norm {b:.6g}, reference {a:.6g}", la, run=(r, j), slot=sa + j)
    if len(ref_runs) != len(oth_runs):
        return Finding(f"the method ran {len(oth_runs)} layer runs, reference {len(ref_runs)}")
    return None


def compare(ref_path, other_path, atol=None, rtol=None, notes=None, every=False, expect=(), convention=None,
            eos=None):
    """Check other against ref; returns [] or plain-words findings, the first divergence first.
    Tolerances default to those of the lower precision of the two runs (tolerances()). notes, a
    list, receives what was not compared (step keys only one trace records) and the expected
    differences (expect). convention: a peer's (skip/trace/convention.py) that ref is rewritten
    to first; eos: the EOS ids it may need."""
    return [f.words for f in findings(ref_path, other_path, atol, rtol, notes, every, expect, convention, eos)]


def findings(ref_path, other_path, atol=None, rtol=None, notes=None, every=False, expect=(), convention=None,
             eos=None):
    """compare's findings as Findings: the words and the place each names."""
    (ref, rt), (oth, ot) = read(ref_path, False), read(other_path, False)
    tol, per_vector, _ = tolerances(ref, oth, atol, rtol)
    if ref["model"] != oth["model"]:
        raise TraceError(f"traces are of different models: {ref['model']} vs {oth['model']}")
    check_tensors(ref, rt, ref_path)
    check_tensors(oth, ot, other_path)
    if ref["prompt"] != oth["prompt"]:
        return [Finding("the prompts differ: nothing else is comparable")]
    out, notes = [], [] if notes is None else notes
    if convention is not None:
        ref = apply(convention, {**ref, "settings": meaning(ref["method"], ref["settings"], [])}, notes, eos)
    if ref["method"] != oth["method"] or not same_settings(
            *(meaning(m["method"], m["settings"], notes) for m in (ref, oth)), notes):
        out.append(Finding(f"the runs differ: reference {ref['method']} {ref['settings']}, "
                           f"other {oth['method']} {oth['settings']}"))
    for name in TENSORS:  # trace_check: both traces hold exactly these and lens_ids
        found = compare_tensor(name, rt[name].float(), ot[name].float(), *tol[name], per_vector and name == "hidden")
        if found:
            out.append(found)
    found = compare_lens_ids(rt, ot, *tol["lens_probs"])
    if found:
        out.append(found)
    if "layer_runs" in ref and "layer_runs" in oth:
        found = compare_layer_runs(ref["layer_runs"], oth["layer_runs"], len(ref["prompt"]), *tol["hidden_norms"])
        if found:
            out.append(found)
    elif "layer_runs" in ref or "layer_runs" in oth:
        notes.append("layer runs are in one trace only: not compared")
    # a port may record fewer step keys than ours: steps are compared on the keys both have (every
    # step of a trace records the same keys: trace_check)
    rk, ok = (set(m["steps"][0]) if m["steps"] else None for m in (ref, oth))
    shared = rk & ok if rk is not None and ok is not None else set()
    if rk is not None and ok is not None and not shared:
        out.append(Finding(f"the steps share no key: reference records {sorted(rk)}, other {sorted(ok)}"))
    elif shared and shared != rk | ok:
        notes.append(f"steps compared on {sorted(shared)}; not in both traces: {sorted((rk | ok) - shared)}")
    if rk is not None and ok is not None and set(expect) - shared:  # (a row with no steps expects nothing)
        raise TraceError(f"--expect {' '.join(sorted(set(expect) - shared))}: not a step key both traces record "
                         f"({', '.join(sorted(shared)) or 'none'})")
    for k in sorted(expect):  # the expected differences: notes (the first of each key, or every one)
        for s, (a, b) in enumerate(zip(ref["steps"], oth["steps"])):
            if found := first_difference(a[k], b[k], tol, k):
                notes.append(f"as expected, step {s} of {ref['method']} differs at {k}{found[0]}: "
                             f"reference {found[1]}, other {found[2]}")
                if not every:
                    break
    checked = sorted(shared - set(expect))
    ref, oth = ({**m, "steps": [{k: st[k] for k in checked} for st in m["steps"]]} for m in (ref, oth))
    for what, label in (("tokens", "generated token {}"), ("steps", f"step {{}} of {ref['method']}")):
        for s, (a, b) in enumerate(zip(ref[what], oth[what])):
            found = first_difference(a, b, tol)
            if found:
                at = f" at {found[0].removeprefix('.')}" if found[0] else ""
                out.append(Finding(f"{label.format(s)} differs{at}: reference {found[1]}, other {found[2]}",
                                   **{what.removesuffix("s"): s}))
                if not every:
                    break
        if len(ref[what]) != len(oth[what]):
            out.append(Finding(f"{len(oth[what])} {what}, reference {len(ref[what])}"))
    if ref.get("flops") is not None and oth.get("flops") is not None and ref["flops"] != oth["flops"]:
        out.append(Finding(f"the FLOPs differ: reference {ref['flops']}, other {oth['flops']}"))
    return out


def compare_lens_ids(rt, ot, atol, rtol):
    """The first logit-lens id that parts beyond a near tie, a Finding in the prompt pass, or None.
    Rank 0 (the lens's prediction) exactly. Below it, an id that one trace lists at rank r and
    with probability p there: the other lists it with a probability within atol + rtol p of p, or
    does not list it and its k-th probability is at least p - atol - rtol p (the id is below it)."""
    ri, rp, oi, op = rt["lens_ids"], rt["lens_probs"].double(), ot["lens_ids"], ot["lens_probs"].double()
    if ri.shape != oi.shape:  # compare_tensor names lens_probs' shape
        return None

    def tied(tok, p, ids, probs):
        at = (ids == tok).nonzero()
        q = probs[int(at[0])] if len(at) else None
        return (abs(p - q) if q is not None else p - probs[-1]) <= atol + rtol * abs(p)
    for i, r in (ri != oi).nonzero().tolist():
        a, b = int(ri[i, r]), int(oi[i, r])
        if r == 0 or not (tied(b, op[i, r], ri[i], rp[i]) and tied(a, rp[i, r], oi[i], op[i])):
            rank = "top-1" if r == 0 else f"rank {r} id"
            return at_state(f"logit-lens {rank} differs first at hidden index {i}: {a} vs {b}", [i])
    return None


# settings that name a file (None) or a folder (the files of it that its reader reads)
PATH_SETTINGS = {"adapter": ("adapter.json", "adapter.safetensors"), "classifier": None}


def meaning(method, settings, notes):
    """A run's settings as the method runs them: defaults filled in, Kangaroo's adapter null when
    only l is given (format.settings_used); settings the method does not run with, as given (noted)."""
    try:
        return settings_used(method, settings)
    except TraceError as e:
        notes.append(f"settings {settings} compared as given: {e}")
        return settings


def same_settings(a, b, notes):
    """Whether two runs' settings are the same, a path by the content of what it names (a note
    where a path names nothing of its kind here, so is compared by its spelling)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if k in PATH_SETTINGS and isinstance(x, str) and isinstance(y, str) and x != y:
            hx, hy = (content_hash(Path(v), PATH_SETTINGS[k]) for v in (x, y))
            if hx is None or hy is None:
                missing = " and ".join(v for v, h in ((x, hx), (y, hy)) if h is None)
                notes.append(f"setting {k}: {missing} not found here, compared by its spelling")
            elif hx == hy:
                continue
        if x != y:
            return False
    return True


def content_hash(path, names=None):
    """SHA-256 of a file's bytes (names None) or of the named files of a folder (each name, size
    and bytes), or None where they are not all files."""
    files = [path] if names is None else [path / n for n in names]
    if not all(f.is_file() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def first_difference(a, b, tol, key=""):
    """The first place two step records part, as (path, reference value, other value), or None:
    integers, booleans (decisions) and strings exactly, real numbers within the tolerance of
    hidden-state norms (under a key ending in _norms) or of lens probabilities (the rest)."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        parts = ((f".{k}", a[k], b[k], k) for k in a)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        parts = ((f"[{i}]", x, y, key) for i, (x, y) in enumerate(zip(a, b)))
    else:
        reals = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) and \
            (isinstance(a, float) or isinstance(b, float))
        atol, rtol = tol["hidden_norms" if key.endswith("_norms") else "lens_probs"]
        # a boolean is never a number (True == 1 in Python, not in a decision)
        same = abs(a - b) <= atol + rtol * abs(a) if reals else a == b and isinstance(a, bool) == isinstance(b, bool)
        return None if same else ("", a, b)
    for name, x, y, k in parts:
        found = first_difference(x, y, tol, k)
        if found:
            return name + found[0], found[1], found[2]
    return None
