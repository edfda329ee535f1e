"""SmolLM2's chat format (ChatML), as its chat template renders it:
a default system message when the conversation has none, then
<|im_start|>{role}\\n{content}<|im_end|>\\n per message, then <|im_start|>assistant\\n."""
from __future__ import annotations

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


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


def encode_chat(tok, user_message) -> list[int]:
    """Token ids of a one-turn chat prompt: the user's message, then the assistant's turn opens."""
    return tok.encode(chatml([{"role": "user", "content": user_message}]))
