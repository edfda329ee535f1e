"""python -m skip.trace write --method full|kangaroo|unified|skipdecode|adainfer --prompt TEXT --out DIR
python -m skip.trace write --method adainfer --classifier FILE.json --prompt TEXT --out DIR   (skip/adainfer_files.py)
python -m skip.trace write --method M --prompt A --prompt B ... --out DIR   (a batch: skip/trace/batch.py)
    --ids "1 2 3" in place of --prompt (token ids, no template), --no-chat (the text without the chat
    template), --eos ID ... or --no-eos (default: the model's EOS), --l L (kangaroo without an adapter)
python -m skip.trace compare REFERENCE OTHER [--atol A] [--rtol R]   (defaults by dtype: TOLERANCES; batches row by row)
    [--all] (every differing token and step, not only the first) [--expect KEY] ... (step keys that may differ)
    status 0: the traces agree, 1: they diverge, 2: unusable input (one line on stderr; skip/trace/check.py)
python -m skip.trace show DIR [--against OTHER] [--out FILE.png] [--model MODEL_DIR]   (skip/trace/show.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model import add_load_args, check_eos, check_prompts, load_model
from model.cli import bad_input, message, output_failed, stdout_checked, writable_file
from model.jsonfile import parse_json
from weights import DEFAULT_MODEL
from weights.files import check_not_reading

from .batch import compare_any, trace_batch
from .convention import CONVENTIONS
from .format import DEFAULTS, TraceError, settings_used
from .methods import trace


def token_ids(text):
    """--ids: token ids separated by spaces or commas."""
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids separated by spaces or commas, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"at least one token id, none negative, got {text!r}")
    return ids


def write_trace(a):
    """`write`: the trace of --method on each --prompt (chat-templated unless --no-chat) or --ids."""
    from tokenizer import encode_chat, load_tokenizer

    def refuse(name):
        raise TraceError(f"holds {name}, which is not JSON")
    try:
        settings = parse_json(a.settings, "--settings", parse_constant=refuse)
    except ValueError as e:
        raise TraceError(str(e)) from None
    if not isinstance(settings, dict):
        raise TraceError(f"--settings must be a JSON object, got {a.settings!r}")
    if a.classifier is not None:
        if a.method != "adainfer":
            raise TraceError(f"--classifier is AdaInfer's stop classifier, not {a.method}'s")
        settings["classifier"] = a.classifier
    if a.l is not None:
        if a.method != "kangaroo":
            raise TraceError(f"--l is adapter-free Kangaroo's exit layer, not {a.method}'s")
        if "l" in settings:
            raise TraceError("l is given twice: in --settings and as --l")
        settings["l"] = a.l
    if a.no_chat and a.ids:
        raise TraceError("--no-chat is for --prompt text; --ids are token ids already")
    if a.batch_size is not None and (len(a.ids or a.prompt) < 2 or a.batch_size < 1):
        raise TraceError("--batch-size B: a queue of two or more prompts through B >= 1 rows")
    used = settings_used(a.method, settings)  # the files it reads are never its output, --force or not
    check_not_reading(a.out, a.model, *(used[k] for k in ("adapter", "classifier") if isinstance(used.get(k), str)))
    model = load_model(a.model, a.dtype, device=a.device)
    if a.eos is not None or a.no_eos:  # every method stops at the model's EOS ids: these, or none
        model.cfg.eos_token_id = sorted(check_eos(model.cfg, [] if a.no_eos else a.eos))
    if a.ids:
        prompts = check_prompts(model.cfg, a.ids)
    else:
        tok = load_tokenizer(a.model)
        prompts = [tok.encode(p) if a.no_chat else encode_chat(tok, p) for p in a.prompt]
    if len(prompts) > 1:  # one batched run, a trace per row
        trace_batch(model, prompts, a.out, a.method, a.max_new_tokens, settings, a.force, a.batch_size)
    else:
        trace(model, prompts[0], a.out, a.method, a.max_new_tokens, settings, a.force)


@stdout_checked
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    w.add_argument("--method", default="full", choices=list(DEFAULTS))
    given = w.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", action="append", help="twice or more: one batched run, "
                       "a trace per row (skip/trace/batch.py)")
    given.add_argument("--ids", type=token_ids, action="append", help='token ids, e.g. "1 2 3" (no chat template); '
                       "twice or more: a batch")
    w.add_argument("--no-chat", action="store_true", help="--prompt as plain text, without the chat template")
    ends = w.add_mutually_exclusive_group()
    ends.add_argument("--eos", type=int, nargs="+", metavar="ID", help="stop at these ids (default: the model's EOS)")
    ends.add_argument("--no-eos", action="store_true", help="never stop before --max-new-tokens")
    w.add_argument("--l", type=int, help="kangaroo without an adapter: draft from layer l with the model's own "
                   "norm and head (the settings' adapter becomes null)")
    w.add_argument("--batch-size", type=int, help="with two or more prompts: a queue through this many rows, "
                   "the next prompt taking a row when one ends (model/queue.py; full, adainfer, kangaroo)")
    w.add_argument("--max-new-tokens", type=int, default=16)
    w.add_argument("--settings", default="{}", help='JSON, e.g. \'{"gamma": 6, "eta": 0.6}\' or \'{"r": 2}\'')
    w.add_argument("--classifier", type=Path, help="adainfer: a stop classifier file (skip/adainfer_files.py) "
                   "in place of tau; the trace records its content")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--force", action="store_true", help="replace an output folder that is not a trace")
    add_load_args(w)
    c = sub.add_parser("compare")
    c.add_argument("reference", type=Path)
    c.add_argument("other", type=Path)
    c.add_argument("--atol", type=float, help="default: by the traces' dtypes (TOLERANCES)")
    c.add_argument("--rtol", type=float, help="default: by the traces' dtypes (TOLERANCES)")
    c.add_argument("--all", action="store_true", help="every differing token and step, not only the first of each")
    c.add_argument("--expect", action="append", default=[], metavar="KEY",
                   help="a step key whose differences are expected (a peer's convention): noted, not a finding; "
                   "once per key")
    c.add_argument("--convention", choices=list(CONVENTIONS), help="a peer's round convention: ours (the reference) "
                   "is rewritten as that peer records the run (skip/trace/convention.py)")
    c.add_argument("--eos", type=int, nargs="+", metavar="ID", help="the EOS ids the run stopped at, for a "
                   "convention that treats an EOS its own way (official, transformers)")
    s = sub.add_parser("show", help="draw what the method ran (skip/trace/show.py)")
    s.add_argument("trace", type=Path)
    s.add_argument("--against", type=Path, help="a second trace: its first divergence is marked")
    s.add_argument("--out", type=Path, help="the PNG to write (default: TRACE/trace.png)")
    s.add_argument("--model", type=Path, help="a model directory: its tokenizer labels the tokens (default: ids)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "show":
            from .show import PNG, show  # matplotlib: only here
            a.out = writable_file(a.out or a.trace / "trace.png", "--out", ("PNG picture", PNG))
            check_not_reading(a.out, *(p for p in (a.trace, a.against, a.model) if p is not None))
            a.out = show(a.trace, a.against, a.out, a.model)
        elif a.cmd == "compare":
            notes, found = compare_any(a.reference, a.other, a.atol, a.rtol, a.all, a.expect, a.convention, a.eos)
            print("\n".join(notes))
            print("\n".join(found) if found else "the traces agree within the tolerances")
            sys.exit(1 if found else 0)
        else:
            write_trace(a)
    except Exception as e:  # bad input (TraceError, LoadError, ...: model/cli.py): one line, status 2
        if output_failed(e):
            raise  # stdout_checked's line
        if not bad_input(e) and a.cmd == "write":
            raise  # a bug here keeps its traceback
        # compare's status says agree (0) or diverge (1): what no check foresaw there is still one
        # line and 2 (unusable input), never a traceback's 1; show reads the same traces
        said = message(e) if bad_input(e) else f"internal error, please report it: {type(e).__name__}: {message(e)}"
        print(f"error: {said}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
