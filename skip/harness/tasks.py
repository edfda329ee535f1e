"""Next-token tasks for AdaInfer: each instance is a prompt whose answer is one token.

Train and test splits are kept apart as ../shared/data/README.md asks: SST-2 train / dev,
AG News train / dev, CommonsenseQA train / dev, MMLU dev+val / test, SQuAD dev split in two (first 20% of the
articles to train, the rest to test); synthetic rule tasks are generated from a seed.
A JSONL file with {"prompt": ..., "answer": ..., "choices": [...]?} per line is a task too.
"""
from __future__ import annotations

import csv
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from model.jsonfile import parse_json, read_text

from .. import DATA

@dataclass
class Instance:
    prompt: str
    answer: str  # the continuation, e.g. " positive"; must be a single token
    choices: list[str] | None = None
    first_token: bool = False  # the answer is the first token of `answer` (SQuAD spans)


@dataclass
class Task:
    name: str
    train: list[Instance]
    test: list[Instance]

    def with_shots(self, inst: Instance, k: int, seed: int) -> Instance:
        """k demonstrations from the train split, then the instance."""
        if k == 0:
            return inst
        demos = random.Random(seed).sample(self.train, k)
        text = "".join(d.prompt + d.answer + "\n\n" for d in demos)
        return Instance(text + inst.prompt, inst.answer, inst.choices, inst.first_token)


def sst2(n_train=None, n_test=None):
    def read(split, n):
        rows = list(csv.reader((DATA / "sst2" / f"{split}.tsv").open(), delimiter="\t", quoting=csv.QUOTE_NONE))[1:n and n + 1]
        return [Instance(f"Review: {s.strip()}\nSentiment:", " positive" if y == "1" else " negative",
                         [" positive", " negative"]) for s, y in rows]
    return Task("sst2", read("train", n_train), read("dev", n_test))


AGNEWS = (" World", " Sports", " Business", " Science")  # classes 1-4; "Sci/Tech" is not one token


def agnews(n_train=None, n_test=None):
    def read(split, n):
        rows = list(csv.reader((DATA / "agnews" / f"{split}.csv").open()))[:n]
        return [Instance(f"Article: {title}. {text}\nTopic:", AGNEWS[int(y) - 1], list(AGNEWS))
                for y, title, text in rows]
    return Task("agnews", read("train", n_train), read("dev", n_test))


def _mc(question, options, answer_letter):
    letters = string.ascii_uppercase[:len(options)]
    body = "".join(f"\n{L}. {o}" for L, o in zip(letters, options))
    return Instance(f"Question: {question}{body}\nAnswer:", " " + answer_letter, [" " + L for L in letters])


def csqa(n_train=None, n_test=None):
    def read(name, n):
        rows = [json.loads(line) for line in (DATA / "csqa" / name).open()][:n]
        return [_mc(r["question"]["stem"], [c["text"] for c in r["question"]["choices"]], r["answerKey"]) for r in rows]
    return Task("csqa", read("train_rand_split.jsonl", n_train), read("dev_rand_split.jsonl", n_test))


def mmlu(n_train=None, n_test=None, seed=0):
    def read(*splits):
        rows = [r for s in splits for f in sorted((DATA / "mmlu" / s).glob("*.csv")) for r in csv.reader(f.open())]
        random.Random(seed).shuffle(rows)  # mixes the 57 subjects before taking the first n
        return [_mc(r[0], r[1:5], r[5]) for r in rows]
    return Task("mmlu", read("dev", "val")[:n_train], read("test")[:n_test])


def squad(n_train=None, n_test=None):
    articles = json.loads((DATA / "squad" / "dev-v1.1.json").read_text())["data"]
    cut = len(articles) // 5

    def read(arts, n):
        out = [Instance(f"{p['context']}\nQuestion: {q['question']}\nAnswer:", " " + q["answers"][0]["text"], None, True)
               for a in arts for p in a["paragraphs"] for q in p["qas"]]
        return out[:n]
    return Task("squad", read(articles[:cut], n_train), read(articles[cut:], n_test))


ANTONYMS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"), ("day", "night"),
            ("high", "low"), ("good", "bad"), ("open", "closed"), ("rich", "poor"), ("happy", "sad"), ("left", "right"),
            ("early", "late"), ("hard", "soft"), ("light", "dark"), ("long", "short"), ("full", "empty"),
            ("wet", "dry"), ("strong", "weak"), ("true", "false"), ("win", "lose"), ("buy", "sell"), ("in", "out"),
            ("thick", "thin"), ("heavy", "light"), ("loud", "quiet"), ("near", "far"), ("first", "last"),
            ("black", "white"), ("top", "bottom"), ("clean", "dirty"), ("safe", "dangerous"), ("north", "south"),
            ("east", "west"), ("yes", "no"), ("more", "less"), ("before", "after"), ("inside", "outside")]
WORDS = ("apple banana cherry river mountain table window garden pencil orange yellow tiger rabbit silver "
         "forest doctor planet music summer winter castle bridge candle dragon engine flower guitar island "
         "jacket kitten lemon market needle ocean pillow queen rocket school turtle umbrella violin wagon").split()


def synthetic(kind, n_train=200, n_test=200, seed=0):
    rng = random.Random(f"{kind}-{seed}")
    if kind == "antonym":
        pool = [Instance(f"Opposite of {a}:", f" {b}") for a, b in ANTONYMS] + \
               [Instance(f"Opposite of {b}:", f" {a}") for a, b in ANTONYMS]
    elif kind == "next_letter":
        pool = [Instance(f"The letter after {c} is", f" {chr(ord(c) + 1)}") for c in string.ascii_letters if c not in "zZ"]
    elif kind == "last_initial":
        pool = []
        for _ in range(n_train + n_test):
            ws = rng.sample(WORDS, rng.randint(3, 5))
            pool.append(Instance(f"Words: {' '.join(ws)}\nFirst letter of the last word, uppercase:", f" {ws[-1][0].upper()}"))
    else:
        raise ValueError(f"unknown synthetic task {kind!r} (antonym, next_letter, last_initial)")
    rng.shuffle(pool)
    half = len(pool) // 2 if kind != "last_initial" else n_train
    return Task(kind, pool[:half][:n_train], pool[half:][:n_test])


def _instance(path, n, line):
    """One JSONL row, checked: an error names the file and the line."""
    where = f"{path}, line {n}"
    r = parse_json(line, where)
    if not isinstance(r, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(r), "a number")
        raise ValueError(f"{where}: expected a JSON object, got {kind}")
    if not {"prompt", "answer"} <= set(r):
        raise ValueError(f"{where}: lacks 'prompt' or 'answer'")
    if not isinstance(r["prompt"], str) or not isinstance(r["answer"], str):
        raise ValueError(f"{where}: 'prompt' and 'answer' must be strings")
    choices = r.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
            raise ValueError(f"{where}: 'choices' must be a list of at least two strings")
        if r["answer"] not in choices:
            raise ValueError(f"{where}: the answer {r['answer']!r} is not among the choices {choices}")
    if not isinstance(r.get("first_token", False), bool):
        raise ValueError(f"{where}: 'first_token' must be true or false")
    return Instance(r["prompt"], r["answer"], choices, r.get("first_token", False))


def from_jsonl(path, n_train=None, n_test=None, seed=0):
    """A task file, one {"prompt", "answer", "choices"?, "first_token"?} per line, shuffled with
    a seed; n_train / n_test instances (default: half each), refused if the file has too few.
    Lines end at "\n" only: JSON strings may hold U+2028, U+0085 and the other characters that
    str.splitlines() also splits at."""
    text = read_text(path, "task file", encoding="utf-8-sig")  # a leading byte-order mark is allowed
    rows = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no instances (expected one JSON object per line)")
    insts = [_instance(path, n, line) for n, line in rows]
    random.Random(seed).shuffle(insts)
    n_train = len(insts) // 2 if n_train is None else n_train
    n_test = len(insts) - n_train if n_test is None else n_test
    if n_train < 1 or n_test < 1 or n_train + n_test > len(insts):
        raise ValueError(f"{path}: {len(insts)} instances cannot give {n_train} to train and {n_test} to test")
    return Task(Path(path).stem, insts[:n_train], insts[n_train:n_train + n_test])


LOADERS = {"sst2": sst2, "agnews": agnews, "csqa": csqa, "mmlu": mmlu, "squad": squad}
SYNTHETIC = ("antonym", "next_letter", "last_initial")
TASKS = (*LOADERS, *SYNTHETIC)


def load_task(name, n_train=None, n_test=None):
    if name in LOADERS:
        return LOADERS[name](n_train, n_test)
    if name in SYNTHETIC:
        return synthetic(name, n_train or 200, n_test or 200)
    if name.endswith(".jsonl"):
        return from_jsonl(name, n_train, n_test)
    raise ValueError(f"unknown task {name!r}")


def encode(tok, inst):
    """(prompt ids, answer id, choice ids or None); the answer and choices must be one token
    (or, with inst.first_token, the answer is the first token of its text)."""
    ids = tok.encode(inst.prompt)

    def one_token(cont, first=False):
        full = tok.encode(inst.prompt + cont)
        if len(full) <= len(ids) or full[:len(ids)] != ids or (len(full) != len(ids) + 1 and not first):
            raise ValueError(f"answer {cont!r} is not a single token after the prompt {inst.prompt[-40:]!r}")
        return full[len(ids)]
    choices = None if inst.choices is None else [one_token(c) for c in inst.choices]
    return ids, one_token(inst.answer, inst.first_token), choices
