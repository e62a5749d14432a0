"""Loading, streaming generation and chat for the MLX backend, on mlx-lm's own utilities.

``load`` reads an MLX folder (quantized or not) or a Hugging Face / fla-hub folder directly:
both hold the same tensor names, so "converting in memory" is only renaming fla spellings
(``Model.sanitize``). Sampling, repetition penalty, detokenizing and the generation loop are
mlx-lm's (``make_sampler``, ``make_logits_processors``, ``stream_generate``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as _mlx_stream_generate
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from regla import checkpoint
from regla.chat import (CONTEXT, SessionError, Turn, chat_delta, check_session, resumed_history,
                        session_metadata, write_atomically)
from regla.checkpoint import CheckpointError
from regla.spec import ConfigError, check_weights

from .model import Model

DTYPES = {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32,
          "bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_model(path_or_repo, dtype: Optional[str] = None) -> Model:
    """The model of an MLX folder (``quantization`` entry honoured) or of an HF/fla-hub folder.

    ``dtype`` (bf16 | f16 | f32) casts the floating weights; None keeps the checkpoint's.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    folder = checkpoint.resolve(path_or_repo)
    config = checkpoint.read_config(folder)
    args = checkpoint.read_args(folder)
    weights = checkpoint.read_weights(folder, "mlx")
    model = Model(args)
    weights = model.sanitize(weights)
    quant = config.get("quantization")
    try:
        if quant:
            # As mlx-lm's loader: quantize exactly the layers the checkpoint stored packed.
            nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                        mode=quant.get("mode", "affine"),
                        class_predicate=lambda p, m: f"{p}.scales" in weights)
        else:
            check_weights(weights, args)
        model.load_weights(list(weights.items()), strict=True)
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    except ValueError as e:  # mlx's own shape / name check, for quantized folders
        raise CheckpointError(f"{folder}: the weights do not match config.json ({e}); "
                              "convert the checkpoint again") from None
    if dtype is not None:
        model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    model.eval()
    return model


def load_tokenizer(path_or_repo) -> TokenizerWrapper:
    """mlx-lm's tokenizer wrapper (streaming detokenizer, EOS ids from config/generation_config)."""
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_tokenizer as _load_tokenizer

    folder = checkpoint.resolve(path_or_repo)
    if not any((folder / n).exists() for n in TOKENIZER_MARKERS):
        raise CheckpointError(f"{folder} has no tokenizer (tokenizer.json / tokenizer.model): copy the "
                              "tokenizer files of the original checkpoint into it")
    eos = load_config(folder).get("eos_token_id")
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json with the generic config class and warns that model_type
    # "regla"/"gla" is not that class: true, irrelevant to the tokenizer, and alarming to users.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _load_tokenizer(folder, eos_token_ids=eos)
    finally:
        hf_logging.set_verbosity(level)


def load(path_or_repo, dtype: Optional[str] = None):
    """``(model, tokenizer)`` from an MLX folder, an HF/fla-hub folder or a hub repo id."""
    folder = checkpoint.resolve(path_or_repo)
    return load_model(folder, dtype), load_tokenizer(folder)


def _generation_kwargs(temp=0.0, top_p=0.0, min_p=0.0, top_k=0, repetition_penalty=None,
                       repetition_context_size=20, **kwargs):
    kwargs["sampler"] = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    if repetition_penalty not in (None, 1.0):
        kwargs["logits_processors"] = make_logits_processors(
            repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size)
    return kwargs


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, *, temp: float = 0.0,
                    top_p: float = 0.0, min_p: float = 0.0, top_k: int = 0,
                    repetition_penalty: Optional[float] = None, repetition_context_size: int = 20,
                    prompt_cache=None, **kwargs) -> Iterator[GenerationResponse]:
    """mlx-lm's ``stream_generate`` with the sampling options as plain arguments.

    ``prompt_cache`` (from ``model.make_cache()``) is updated in place: pass the same one again
    with only new tokens to continue a conversation without re-reading it.
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    kw = _generation_kwargs(temp, top_p, min_p, top_k, repetition_penalty, repetition_context_size, **kwargs)
    yield from _mlx_stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                    prompt_cache=prompt_cache, **kw)


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> str:
    """The whole completion as one string (``verbose`` prints it as it streams, then timings)."""
    text, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s")
        print(f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s")
    return "".join(text)


# ------------------------------------------------------------------ chat
def encode(tokenizer, text: str, first: bool) -> list:
    """Token ids of ``text``; special tokens (BOS) only at the very start of a conversation."""
    return list(tokenizer.encode(text, add_special_tokens=first))


@dataclass
class ChatSession:
    """A conversation kept in the recurrent cache: each turn feeds only its own new tokens."""

    model: Model
    tokenizer: TokenizerWrapper
    max_tokens: int = 512
    sampling: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    model_path: Optional[str] = None  # recorded in saved sessions (mlx_lm.generate reads it back)

    def __post_init__(self):
        if not isinstance(self.tokenizer, TokenizerWrapper):
            self.tokenizer = TokenizerWrapper(self.tokenizer)
        self.use_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.reset()

    def reset(self):
        self.cache = make_prompt_cache(self.model)
        self.history = []
        self.consumed = ""  # the conversation as the state has read it (template mode)
        self.tokens = []  # every token id the state has read, in order
        self.turns, self.ended = 0, False  # answers so far; whether the last one ended with EOS

    def save(self, path):
        """The conversation's state as mlx-lm's prompt-cache file (constant size for linear
        layers); ``mlx_lm.generate --prompt-cache-file`` can continue it."""
        meta = session_metadata("mlx", self.model.args, self.model_path, self.turns, self.ended,
                                self.tokens[-CONTEXT:])
        return write_atomically(path, lambda tmp: save_prompt_cache(tmp, self.cache, meta))

    def load(self, path):
        """Resume a conversation saved by ``save`` (or a prompt cache of ``mlx_lm.cache_prompt``
        for this model); refuses a file of another model or backend."""
        from pathlib import Path

        if not Path(path).expanduser().is_file():
            raise SessionError(f"{path}: no such session file")
        try:
            _, raw = mx.load(str(Path(path).expanduser()), return_metadata=True)
        except Exception as e:  # safetensors/mlx errors of a damaged file
            raise SessionError(f"{path} cannot be read as a session ({e}); was it written completely?") from None
        fields = check_session(raw, "mlx", self.model.args, path)
        try:
            cache = load_prompt_cache(str(Path(path).expanduser()))
        except Exception as e:
            raise SessionError(f"{path} cannot be read as mlx-lm's prompt cache ({e})") from None
        fresh = make_prompt_cache(self.model)
        if [type(c).__name__ for c in cache] != [type(c).__name__ for c in fresh]:
            raise SessionError(f"{path} holds a state for another layer layout than this model's")
        self.reset()
        self.cache, self.turns, self.ended, self.tokens = cache, fields["turns"], fields["ended"], fields["context"]
        if self.use_template and self.turns:
            self.history, self.consumed = resumed_history(self.tokenizer, self.ended)

    def _snapshot(self):
        # fresh containers: ArraysCache.state hands out its own list, which later steps overwrite
        return [tree_map(lambda x: x, c.state) for c in self.cache]

    def _restore(self, snap):
        for c, s in zip(self.cache, snap):
            c.state = s

    def _feed(self, ids):
        """Advance the state over ``ids`` without sampling (resuming after an interrupt)."""
        if ids:
            self.model(mx.array(ids)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])

    def prompt_ids(self, message: str) -> tuple[list, str]:
        first = not self.tokens
        if self.use_template:
            delta, consumed = chat_delta(self.tokenizer, self.history, message, self.consumed)
            return encode(self.tokenizer, delta, False), consumed
        text = message if first else "\n" + message
        return encode(self.tokenizer, text, first), self.consumed + text

    def ask(self, message: str, on_text=None) -> Turn:
        """Answer ``message``, streaming text to ``on_text``. Ctrl-C (KeyboardInterrupt) ends the
        answer early; what was said so far stays in the conversation."""
        ids, consumed = self.prompt_ids(message)
        if not ids:  # an empty template delta still needs one token to produce logits
            ids = encode(self.tokenizer, message or " ", False)
        snap = self._snapshot()
        pieces, gen_ids, finish, interrupted, tps = [], [], None, False, 0.0
        start = time.perf_counter()
        try:
            for r in stream_generate(self.model, self.tokenizer, ids, self.max_tokens,
                                     prompt_cache=self.cache, **self.sampling):
                # book-keep before showing: a Ctrl-C inside on_text must keep the token shown
                if r.finish_reason is None or r.finish_reason == "length":
                    gen_ids.append(r.token)
                else:
                    eos_id = r.token
                finish, tps = r.finish_reason, r.generation_tps
                pieces.append(r.text)
                if on_text is not None and r.text:
                    on_text(r.text)
        except KeyboardInterrupt:
            interrupted = True
            # The interrupted step may have updated some layers and not others: go back to the
            # turn's start and re-read the prompt and the tokens the user already saw.
            self._restore(snap)
            self._feed(ids + gen_ids)
            self.tokens += ids + gen_ids
        else:
            # generate_step has already fed every yielded token (and a final EOS) to the cache.
            self.tokens += ids + gen_ids + ([eos_id] if finish == "stop" else [])
        seconds = time.perf_counter() - start
        answer = "".join(pieces)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        self.turns, self.ended = self.turns + 1, finish == "stop" and not interrupted
        eos = self.tokenizer.eos_token if (finish == "stop" and not interrupted) else ""
        self.consumed = consumed + answer + (eos or "")
        if interrupted or not tps:
            tps = len(gen_ids) / seconds if seconds > 0 else 0.0
        return Turn(answer, len(gen_ids), seconds, finish, interrupted, tps, len(ids))

    def complete(self, prompt: str, on_text=None) -> Turn:
        """One-shot continuation of ``prompt`` (no chat template), from a fresh state."""
        self.reset()
        self.use_template, template = False, self.use_template
        try:
            return self.ask(prompt, on_text)
        finally:
            self.use_template = template
            self.reset()
