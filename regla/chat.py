"""Chat book-keeping shared by both backends' sessions (framework-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Turn:
    """One answer: its text, how many tokens, how fast, and whether Ctrl-C cut it short."""

    text: str
    tokens: int
    seconds: float
    finish_reason: Optional[str]
    interrupted: bool = False
    tokens_per_second: float = 0.0  # decode speed (mlx-lm's count, prompt reading excluded)
    prompt_tokens: int = 0


def chat_delta(tokenizer, history: list, message: str, consumed: str) -> tuple[str, str]:
    """The text to feed for the next user turn, and what the state will then have read.

    The state already holds ``consumed`` (the rendered conversation as generated). When the
    template renders the longer conversation as an extension of it, only the new tail is fed.
    Otherwise (templates that trim or rewrite earlier turns) the tail after the rendered
    history is used: the state stays a faithful summary, just not byte-identical.
    """
    msgs = history + [{"role": "user", "content": message}]
    full = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if full.startswith(consumed):
        return full[len(consumed):], full
    past = tokenizer.apply_chat_template(history, tokenize=False) if history else ""
    tail = full[len(past):] if full.startswith(past) else full
    return tail, consumed + tail
