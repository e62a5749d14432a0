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


# ------------------------------------------------------------------ saved sessions
# A saved chat is the recurrent state plus a few fields of metadata: which model it belongs to
# (a hash of its config), how many turns it holds, whether the last answer ended with EOS and
# the last tokens (the repetition penalty's window). No transcript: a linear model's file stays
# the same size however long the conversation. On MLX it is mlx-lm's prompt-cache file, so
# ``mlx_lm.generate --prompt-cache-file`` continues it and ``regla chat`` loads what
# ``mlx_lm.cache_prompt`` writes.
SESSION_VERSION = "1"
CONTEXT = 20  # tokens kept for the repetition penalty's window (mlx-lm's default)


class SessionError(ValueError):
    """A session file that cannot be loaded here; the message says why and what to do."""


def model_identity(args) -> str:
    """A short hash of everything in the config that changes the model's math."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(args.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def session_metadata(backend: str, args, model_path, turns: int, ended: bool, context=(), pending=()) -> dict:
    import json

    return {"regla_session": SESSION_VERSION, "backend": backend, "config_hash": model_identity(args),
            "model": str(model_path or ""), "tokenizer_config": "{}", "turns": str(turns),
            "ended": "1" if ended else "0", "context": json.dumps([int(t) for t in list(context)[-CONTEXT:]]),
            "pending": json.dumps([int(t) for t in pending])}


def check_session(meta: dict, backend: str, args, path) -> dict:
    """The session's fields after checking it belongs to this model and backend; a prompt cache
    made by mlx-lm (``mlx_lm.cache_prompt``) is accepted when its model folder has this config."""
    import json

    if "regla_session" not in meta and "model" not in meta:
        # read raw, mlx-lm's prompt-cache files keep the metadata under a prefix ("1.")
        inner = [k[:-len(name)] for name in ("regla_session", "model") for k in meta if k.endswith("." + name)]
        if inner:
            meta = {k[len(inner[0]):]: v for k, v in meta.items() if k.startswith(inner[0])}
    if meta.get("regla_session") is None:
        if backend != "mlx" or "model" not in meta:
            raise SessionError(f"{path} is not a regla chat session (no session metadata)")
        from regla import checkpoint

        try:
            theirs = model_identity(checkpoint.read_args(checkpoint.resolve(meta["model"])))
        except (checkpoint.CheckpointError, ValueError) as e:
            raise SessionError(f"{path} was made by mlx-lm for the model {meta['model']!r}, which cannot be "
                               f"read here to check it is this one ({e})") from None
        if theirs != model_identity(args):
            raise SessionError(f"{path} was made for the model {meta['model']!r}, not this one: "
                               f"chat with --model {meta['model']}")
        return {"turns": 0, "ended": False, "context": [], "pending": []}
    if meta.get("backend") != backend:
        raise SessionError(f"{path} was saved by the {meta.get('backend')} backend: load it with "
                           f"--backend {meta.get('backend')}")
    if meta.get("config_hash") != model_identity(args):
        was = f" ({meta['model']})" if meta.get("model") else ""
        raise SessionError(f"{path} belongs to another model{was} (config {meta.get('config_hash')}, this "
                           f"one is {model_identity(args)}): load it with the model it was saved with")
    return {"turns": int(meta["turns"]), "ended": meta["ended"] == "1", "context": json.loads(meta["context"]),
            "pending": json.loads(meta["pending"])}


def resumed_history(tokenizer, ended: bool) -> tuple[list, str]:
    """A stand-in for a saved conversation's history, and what its state has read: one empty
    user turn and one empty answer. A chat template renders the next user turn after it just as
    after the real conversation, so ``chat_delta`` feeds a resumed chat the same tokens as one
    that never stopped."""
    stub = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    consumed = tokenizer.apply_chat_template(stub[:1], add_generation_prompt=True, tokenize=False)
    return stub, consumed + ((tokenizer.eos_token or "") if ended else "")


def write_atomically(path, write):
    """``write(tmp)`` to a temporary file beside ``path``, then rename: a crash or a full disk
    never leaves a half-written session."""
    import os
    from pathlib import Path

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise SessionError(f"{path.parent} does not exist: create it first or save elsewhere")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.safetensors")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
