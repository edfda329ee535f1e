"""Chat prompts: the model's own chat template where it ships one (tokenizer_config.json's
"chat_template", rendered with jinja2 as transformers' apply_chat_template renders it), else
ChatML, SmolLM2's format: a default system message when the conversation has none, then
<|im_start|>{role}\\n{content}<|im_end|>\\n per message, then <|im_start|>assistant\\n.
jinja2 is an optional dependency (the `chat` extra); without it a shipped template is not
used, and the first chat prompt says so."""
from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path

from model.jsonfile import read_json

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def chatml(messages, add_generation_prompt=True, default_system=DEFAULT_SYSTEM) -> str:
    if not messages:
        raise ValueError("a chat needs at least one message")
    out = []
    if messages[0]["role"] != "system" and default_system is not None:
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def read_chat_template(model_dir):
    """(template or None, {bos_token: ..., eos_token: ...}) from tokenizer_config.json; a list of
    named templates gives the one named "default"."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.exists():
        return None, {}
    cfg = read_json(path, "tokenizer config", 64 << 20)
    template = cfg.get("chat_template")
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: chat_template must be text or a list of named templates, got {template!r:.40}")
    tokens = {k: v if isinstance(v, str) else (v or {}).get("content") for k, v in cfg.items() if k in SPECIAL_KEYS}
    return template, tokens


def render_chat(template, messages, add_generation_prompt=True, source="chat template", **tokens) -> str:
    """A chat template rendered as transformers renders it (tokens: bos_token, eos_token, ...),
    with bounded work and memory (tokenizer/template.py); source names the template in errors."""
    from .template import render
    if not messages:
        raise ValueError("a chat needs at least one message")
    return render(template, source, messages=messages, add_generation_prompt=add_generation_prompt, **tokens)


@functools.lru_cache(maxsize=1)
def _have_jinja2():
    return importlib.util.find_spec("jinja2") is not None


def encode_chat(tok, user_message) -> list[int]:
    """Token ids of a one-turn chat prompt: the user's message, then the assistant's turn opens;
    through the tokenizer's chat template (load_tokenizer attaches it) or ChatML."""
    messages = [{"role": "user", "content": user_message}]
    template = getattr(tok, "chat_template", None)
    if template and _have_jinja2():  # the template writes its own BOS: no special tokens added
        source = getattr(tok, "chat_source", "chat template")
        return tok.encode(render_chat(template, messages, source=source, **tok.chat_tokens), add_special_tokens=False)
    if template and not getattr(tok, "warned_chat", False):
        tok.warned_chat = True
        warnings.warn("the model's chat template needs jinja2 (pip install jinja2); using ChatML instead",
                      stacklevel=2)
    return tok.encode(chatml(messages))
