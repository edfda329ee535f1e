from pathlib import Path

from .bpe import BPETokenizer
from .chat import DEFAULT_SYSTEM, chatml, encode_chat
from .sp import SentencePieceTokenizer


def load_tokenizer(model_dir):
    """The tokenizer files of a model directory: tokenizer.json (BPE) or tokenizer.model (SentencePiece)."""
    d = Path(model_dir)
    if (d / "tokenizer.json").exists():
        return BPETokenizer.from_tokenizer_json(d / "tokenizer.json")
    if (d / "tokenizer.model").exists():
        return SentencePieceTokenizer(d / "tokenizer.model")
    raise FileNotFoundError(f"{d} has neither tokenizer.json nor tokenizer.model")


__all__ = ["BPETokenizer", "DEFAULT_SYSTEM", "SentencePieceTokenizer", "chatml", "encode_chat", "load_tokenizer"]
