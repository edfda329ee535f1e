from pathlib import Path

from .bpe import BPETokenizer
from .chat import DEFAULT_SYSTEM, chatml, encode_chat, read_chat_template, render_chat
from .sp import SentencePieceTokenizer


def load_tokenizer(model_dir):
    """The tokenizer files of a model directory: tokenizer.json (BPE) or tokenizer.model (SentencePiece)."""
    d = Path(model_dir)
    if not (d / "tokenizer.json").exists() and not (d / "tokenizer.model").exists():
        raise FileNotFoundError(f"{d} has neither tokenizer.json nor tokenizer.model")
    try:  # a file of the wrong shape (a list for an object, a number for a list) fails somewhere inside
        if (d / "tokenizer.json").exists():
            tok = BPETokenizer.from_tokenizer_json(d / "tokenizer.json")
        else:
            tok = SentencePieceTokenizer(d / "tokenizer.model")
        tok.chat_template, tok.chat_tokens = read_chat_template(d)  # what encode_chat renders, if any
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"the tokenizer files of {d} are not what they should be: {type(e).__name__} {e}") from None
    tok.chat_source = f"the chat template of {d / 'tokenizer_config.json'}"
    return tok


__all__ = ["BPETokenizer", "DEFAULT_SYSTEM", "SentencePieceTokenizer", "chatml", "encode_chat", "load_tokenizer",
           "read_chat_template", "render_chat"]
