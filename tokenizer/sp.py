"""Llama-2-style tokenizer.model files, through the sentencepiece library."""
from __future__ import annotations

import sentencepiece as spm


class SentencePieceTokenizer:
    def __init__(self, path, add_bos=True):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.add_bos = add_bos
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return ([self.bos_id] if self.add_bos and self.bos_id >= 0 else []) + self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) != self.bos_id])

    def token_bytes(self, i: int) -> bytes:
        piece = self.sp.id_to_piece(int(i))
        if self.sp.is_byte(int(i)):  # <0xAB>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()
