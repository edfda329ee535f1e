"""Byte-level BPE (GPT-2 and Llama-3 style), from scratch, with only the standard library.

encode: split out special tokens (kept whole) -> pre-tokenize with the GPT-2 regex
(optionally every digit alone first, as SmolLM2's tokenizer.json does) or Llama-3's regex ->
map each UTF-8 byte to a printable character (bytes_to_unicode) -> apply merges by rank (with
Llama-3's ignore_merges, a chunk that is itself a token stays whole) -> prepend what the
post-processor adds (Llama-3: <|begin_of_text|>) unless add_special_tokens=False.
Python's `re` has no \\p{L}; the letter / number / whitespace classes are built from
unicodedata, with whitespace as Unicode's White_Space property (what Rust's \\s means).
"""
from __future__ import annotations

import functools
import heapq
import re
import unicodedata
import warnings
from array import array

from model.config import LIMITS, is_int
from model.jsonfile import read_json


CACHE_CHUNK, CACHE_SIZE = 256, 10_000  # pre-tokens cached: shorter than this, this many (the library's)
MAX_RUNS = 16  # sorted runs of one rank's positions before they are merged into one


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map: printable bytes stand for themselves, the rest move to 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _char_class(first_letter: str) -> str:
    """Regex class body of every code point whose general category starts with first_letter."""
    ranges, start = [], None
    for cp in range(0x110001):
        hit = cp < 0x110000 and unicodedata.category(chr(cp))[0] == first_letter
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            ranges.append(re.escape(chr(start)) + ("" if cp - 1 == start else "-" + re.escape(chr(cp - 1))))
            start = None
    return "".join(ranges)


@functools.lru_cache(maxsize=1)
def gpt2_pattern() -> re.Pattern:
    # 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    L, N, S = _char_class("L"), _char_class("N"), WHITE_SPACE
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


# Llama 3's pre-tokenizer (a Split with this regex, then ByteLevel without its own regex)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=1)
def llama3_pattern() -> re.Pattern:
    L, N, S = _char_class("L"), _char_class("N"), WHITE_SPACE
    return re.compile(rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}| ?[^{S}{L}{N}]+[\r\n]*|"
                      rf"[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")


@functools.lru_cache(maxsize=1)
def digit_pattern() -> re.Pattern:
    return re.compile(f"([{_char_class('N')}])")


MAX_ID = LIMITS["vocab_size"]  # a token id is below the largest vocabulary a config may give


def check_vocabulary(vocab, merges, specials, prefix):
    """Refuse a tokenizer whose content lies, as the tokenizers library does: ids that are not
    distinct integers in [0, MAX_ID) (an id of 10^12 would size a table), a merge that is not two
    tokens of the vocabulary whose concatenation is one too, special or prefix tokens not in it."""
    ids = list(vocab.values()) if isinstance(vocab, dict) else None
    if ids is None or not all(isinstance(t, str) for t in vocab) or not all(
            is_int(i) and 0 <= i < MAX_ID for i in ids):
        raise ValueError(f"tokenizer vocabulary: tokens must map to integer ids in [0, {MAX_ID})")
    if len(set(ids)) != len(ids):
        raise ValueError("tokenizer vocabulary: two tokens share an id")
    for r, m in enumerate(merges):
        if len(m) != 2 or not all(isinstance(t, str) for t in m):
            raise ValueError(f"tokenizer merge {r} is not a pair of tokens: {m!r:.60}")
        missing = [t for t in (m[0], m[1], m[0] + m[1]) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer merge {r} ({m[0]!r} {m[1]!r}) names {missing[0]!r:.40}, not in the vocabulary")
    if not all(isinstance(t, str) and t in vocab for t in specials) or not set(prefix) <= set(ids):
        raise ValueError("tokenizer: a special token or a prefix id is not in the vocabulary")


def named(path, build):
    """build(), its ValueError naming the file it was built from."""
    try:
        return build()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


class BPETokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str],
                 split_digits=False, pattern="gpt2", ignore_merges=False, prefix=()):
        check_vocabulary(vocab, merges, specials, prefix)
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        # the merges over token ids: (left << 32 | right) -> rank -> the pair and the merged id
        self.pair_rank, self.rank_pair, self.rank_new = {}, [-1] * len(merges), [-1] * len(merges)
        for (a, b), r in self.ranks.items():
            self.pair_rank[vocab[a] << 32 | vocab[b]] = r  # every part is in vocab: check_vocabulary
            self.rank_pair[r], self.rank_new[r] = vocab[a] << 32 | vocab[b], vocab[a + b]
        self.specials = {t: vocab[t] for t in specials}
        self.special_ids = set(self.specials.values())
        by_length = sorted(specials, key=len, reverse=True)  # leftmost-longest match
        self.special_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if specials else None
        self.split_digits, self.pattern, self.ignore_merges = split_digits, pattern, ignore_merges
        self.prefix = list(prefix)  # ids the post-processor puts before the text (a BOS)
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.byte_id = [vocab.get(self.byte_char[b], -1) for b in range(256)]
        self.longest = max(map(len, vocab), default=0)
        self.id_int = list(range(max(vocab.values(), default=-1) + 1))
        self._cache: dict[str, list[int]] = {}
        self.dropped: set[int] = set()  # bytes without a token met so far, each announced once

    # ------------------------------------------------------------ loading
    @classmethod
    def from_tokenizer_json(cls, path):
        """A HF tokenizer.json with a byte-level BPE model: GPT-2's ByteLevel pre-tokenizer (optionally
        after Digits, as SmolLM2's) or Llama 3's Split + ByteLevel; a TemplateProcessing
        post-processor's leading special tokens (Llama 3's BOS) become the prefix."""
        spec = read_json(path, "tokenizer file")
        model = spec["model"]
        if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
            raise ValueError(f"{path}: only byte-level BPE models are supported, got {model.get('type')}")
        pre = spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        kinds = [s.get("type") for s in steps]
        llama3 = kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and not steps[1].get("use_regex")
        gpt2 = kinds in (["ByteLevel"], ["Digits", "ByteLevel"]) and steps[-1].get("use_regex", True) \
            and (kinds[0] != "Digits" or steps[0]["individual_digits"])
        if not (llama3 or gpt2) or steps[-1].get("add_prefix_space"):
            raise ValueError(f"{path}: unsupported pre_tokenizer {pre}")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        specials = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
        post = spec.get("post_processor") or {}
        procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        prefix = []
        for proc in procs:
            if proc.get("type") == "TemplateProcessing":
                for item in proc["single"]:
                    if "Sequence" in item:
                        break
                    prefix += proc["special_tokens"][item["SpecialToken"]["id"]]["ids"]
        vocab = dict(model["vocab"])  # with the added tokens (Llama 3 keeps its specials only there)
        for t in spec.get("added_tokens", []):
            vocab.setdefault(t["content"], t["id"])
        return named(path, lambda: cls(vocab, merges, specials, split_digits=kinds[0] == "Digits",
                                       pattern="llama3" if llama3 else "gpt2",
                                       ignore_merges=bool(model.get("ignore_merges")), prefix=prefix))

    @classmethod
    def from_gguf(cls, path):
        """Vocabulary and merges of a GGUF file, as transformers reads them (control tokens special)."""
        from gguf import GGUFReader  # conversion-time dependency only

        fields = GGUFReader(path).fields
        if fields["tokenizer.ggml.model"].contents() != "gpt2":
            raise ValueError(f"{path}: tokenizer model is not byte-level BPE ('gpt2')")
        tokens = fields["tokenizer.ggml.tokens"].contents()
        types = fields["tokenizer.ggml.token_type"].contents()
        merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
        alphabet = set(bytes_to_unicode().values())
        spelled = {}
        for i, t in enumerate(tokens):  # a token stored as raw text is respelled in the byte alphabet
            spelled[t if set(t) <= alphabet else "".join(bytes_to_unicode()[b] for b in t.encode())] = i
        specials = [t for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]  # 3 = CONTROL
        return named(path, lambda: cls(spelled, merges, specials))

    # ------------------------------------------------------------ encode / decode
    def pre_tokenize(self, text: str) -> list[str]:
        parts = digit_pattern().split(text) if self.split_digits else [text]
        pattern = llama3_pattern() if self.pattern == "llama3" else gpt2_pattern()
        return [chunk for part in parts if part for chunk in pattern.findall(part)]

    def _bpe(self, chunk: str) -> list[int]:
        """The ids of one pre-token: merges applied lowest rank first, leftmost first among equal
        ranks (the order of the tokenizers library's heap, word.rs merge_all), on int arrays."""
        if chunk in self._cache:
            return self._cache[chunk]
        # A byte with no token (SmolLM2 lacks e.g. 0x16) is dropped before merging, as the
        # tokenizers library does: its neighbours may then merge ('"', 0x16, ':' -> '":').
        data = chunk.encode("utf-8")
        new = {b for b in set(data) if self.byte_id[b] < 0} - self.dropped
        if new:
            self.dropped |= new
            warnings.warn(f"byte(s) {', '.join(f'0x{b:02x}' for b in sorted(new))} of {chunk[:40]!r}"
                          f"{'...' if len(chunk) > 40 else ''} have no token in this vocabulary and are dropped "
                          "(as the tokenizers library does)", stacklevel=3)
        syms = array("i", (self.byte_id[b] for b in data if self.byte_id[b] >= 0))  # token id per symbol
        whole = self.vocab.get("".join(self.byte_char[b] for b in data if self.byte_id[b] >= 0)) \
            if self.ignore_merges and len(syms) <= self.longest else None
        ids = [whole] if whole is not None else self._merge(syms)
        if len(chunk) < CACHE_CHUNK and len(self._cache) < CACHE_SIZE:
            self._cache[chunk] = ids
        return ids

    def _merge(self, syms: array) -> list[int]:
        """Merge in place: symbol p's right neighbour is nxt[p] (-1: none), a merged-away symbol
        is -1 in syms. pending[rank] holds the left positions of that rank's pairs as ascending
        int arrays (runs, merged lazily): 4 bytes an entry, not a Python object."""
        n = len(syms)
        nxt, prv = array("i", range(1, n + 1)), array("i", range(-1, n - 1))
        if n:
            nxt[-1] = -1
        pending: dict[int, list[array]] = {}
        heap: list[int] = []  # the ranks in pending

        def push(rank, pos):
            runs = pending.get(rank)
            if runs is None:
                pending[rank] = [array("i", (pos,))]
                heapq.heappush(heap, rank)
            elif pos > runs[-1][-1]:
                runs[-1].append(pos)
            elif pos < runs[-1][-1]:  # out of order: a new run (compacted when they pile up)
                runs.append(array("i", (pos,)))
                if len(runs) > MAX_RUNS:
                    runs[:] = [array("i", heapq.merge(*runs))]

        for i in range(n - 1):
            rank = self.pair_rank.get(syms[i] << 32 | syms[i + 1])
            if rank is not None:
                push(rank, i)
        while heap:
            r = heapq.heappop(heap)
            runs = pending.pop(r)
            key, merged = self.rank_pair[r], self.rank_new[r]
            todo = heapq.merge(*runs) if len(runs) > 1 else iter(runs[0])
            for p in todo:
                q = nxt[p] if syms[p] >= 0 else -1
                if q < 0 or (syms[p] << 32 | syms[q]) != key:
                    continue  # stale: p merged away, or its pair changed since it was pushed
                syms[p], syms[q] = merged, -1
                nq = nxt[q]
                nxt[p] = nq
                if nq >= 0:
                    prv[nq] = p
                early = False  # a new pair of rank <= r goes before the rest of r, as in a heap
                for a, b in ((prv[p], p), (p, nq)):
                    rank = self.pair_rank.get(syms[a] << 32 | syms[b]) if a >= 0 and b >= 0 else None
                    if rank is not None:
                        push(rank, a)
                        early = early or rank <= r
                if early:  # only with merges listed before the merges that make their parts
                    rest = array("i", todo)
                    if rest:
                        if r not in pending:
                            pending[r] = []
                            heapq.heappush(heap, r)
                        pending[r].append(rest)
                    break
        return [self.id_int[s] for s in syms if s >= 0]  # shared int objects: 8 bytes a token

    def encode(self, text: str, add_special_tokens=True) -> list[int]:
        lone = re.search("[\ud800-\udfff]", text)
        if lone:  # not Unicode: it has no UTF-8 bytes to tokenize
            raise ValueError(f"text holds a lone surrogate U+{ord(lone.group()):04X} at index {lone.start()}; "
                             "it is not valid Unicode (is the input valid UTF-8?)")
        ids = list(self.prefix) if add_special_tokens else []
        pieces = self.special_re.split(text) if self.special_re else [text]
        for piece in pieces:
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                for chunk in self.pre_tokenize(piece):
                    ids.extend(self._bpe(chunk))
        return ids

    def token_bytes(self, i: int) -> bytes:
        t = self.id_to_token[i]
        return t.encode() if i in self.special_ids else bytes(self.char_byte[c] for c in t)

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int:
        """The id of text if it is exactly one token, else a ValueError."""
        ids = self.encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens, not one")
        return ids[0]
