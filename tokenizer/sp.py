"""Llama-2-style tokenizer.model files, through the sentencepiece library (the reference
implementation itself; tests/test_tokenizer.py checks transformers' Llama tokenizer against it)."""
from __future__ import annotations

import re

import sentencepiece as spm


class SentencePieceTokenizer:
    def __init__(self, path, add_bos=True):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.add_bos = add_bos
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.specials = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id) if i >= 0}
        self.special_re = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")
        self.unk_len = len(self.sp.encode(self.sp.id_to_piece(self.sp.unk_id())))  # "<unk>" as text, prefix included

    def encode(self, text: str, add_special_tokens=True) -> list[int]:
        """Llama 2's convention: BOS first (unless add_special_tokens=False), no EOS; the model's
        own normalizer (a dummy-prefix space) and byte fallback (<0xAB> pieces) apply."""
        ids = [self.bos_id] if add_special_tokens and self.add_bos and self.bos_id >= 0 else []
        for i, piece in enumerate(self.special_re.split(text)):  # <s>, </s> in the text (chat templates) are tokens
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece and i == 0:
                ids += self.sp.encode(piece)
            elif piece:  # after a special token, no dummy-prefix space (transformers' Llama tokenizer)
                ids += self.sp.encode(self.sp.id_to_piece(self.sp.unk_id()) + piece)[self.unk_len:]
        return ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) != self.bos_id])

    def token_bytes(self, i: int) -> bytes:
        piece = self.sp.id_to_piece(int(i))
        if self.sp.is_byte(int(i)):  # <0xAB>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()
