from pathlib import Path

from .bpe import BPETokenizer
from .chat import DEFAULT_SYSTEM, chatml, encode_chat, read_chat_template, render_chat
from .sp import SentencePieceTokenizer


def load_tokenizer(model_dir):
    """The tokenizer files of a model directory: tokenizer.json (BPE) or tokenizer.model (SentencePiece)."""
    d = Path(model_dir)
    if (d / "tokenizer.json").exists():
        tok = BPETokenizer.from_tokenizer_json(d / "tokenizer.json")
    elif (d / "tokenizer.model").exists():
        tok = SentencePieceTokenizer(d / "tokenizer.model")
    else:
        raise FileNotFoundError(f"{d} has neither tokenizer.json nor tokenizer.model")
    tok.chat_template, tok.chat_tokens = read_chat_template(d)  # what encode_chat renders, if any
    tok.chat_source = f"the chat template of {d / 'tokenizer_config.json'}"
    return tok


__all__ = ["BPETokenizer", "DEFAULT_SYSTEM", "SentencePieceTokenizer", "chatml", "encode_chat", "load_tokenizer",
           "read_chat_template", "render_chat"]
