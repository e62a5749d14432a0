"""Generation and chat on the PyTorch backend: the twin of ``regla_mlx.generate``.

Sampling uses transformers' logits processors; the conversation lives in a
``RecurrentCache`` so each token costs O(1) for the linear layers.
"""

from __future__ import annotations

import json

from regla.chat import (CONTEXT, SessionError, Turn, chat_delta, check_session, resumed_history,
                        session_metadata, write_atomically)


def load_tokenizer(path):
    """The checkpoint's tokenizer via transformers' AutoTokenizer, with a clear error if it has none."""
    from transformers import AutoTokenizer

    from regla import checkpoint

    folder = checkpoint.resolve(path)
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise checkpoint.CheckpointError(f"{folder} has no tokenizer (tokenizer.json / tokenizer.model): copy "
                                         "the tokenizer files of the original checkpoint into it")
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json with the generic config class and warns that model_type
    # "gla"/"gsa" is not that class: true, irrelevant to the tokenizer, and alarming to users.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(level)


def _decode(model, ids, states):
    logits, new = model.run_layers(ids, states, None, True, 1)
    return logits[:, -1], new


_COMPILED = []


def _compiled_decode():
    """One compiled ``_decode`` per process: a new turn (new state tensors of the same shapes)
    reuses the compiled code instead of compiling again."""
    import torch

    if not _COMPILED:
        _COMPILED.append(torch.compile(_decode, dynamic=False))
    return _COMPILED[0]


def persistent_step(model):
    """The model's whole batch-1 decode step as one persistent kernel
    (``ops.triton.persistent_step.PersistentStep``), built on first use and kept on the model
    (it holds a second, repacked copy of the weights); None where it does not apply: not a
    Hopper GPU, a layer other than regla/gla, short convolutions, grouped key heads, a map other
    than identity or safe-exp, a head norm other than RMSNorm, no output gate, a full-rank gate,
    a shape the kernel does not take, or ``REGLA_PERSISTENT=0`` (the per-layer launches)."""
    import os

    import torch

    from .model import LinearAttention
    from .ops.triton import persistent_step as ps

    if os.environ.get("REGLA_PERSISTENT", "1") == "0":
        return None
    # the packed copy is of the weights as they were: rebuilt when any changed in place (an
    # optimizer's step, load_state_dict) or moved
    params = list(model.parameters())
    p = params[0]
    key = (p.data_ptr(), sum(q._version for q in params))
    built = getattr(model, "_persistent_step", None)
    if built is not None and model._persistent_key == key:
        return built or None
    model._persistent_step = None  # the old copy freed before a new one is made
    a = model.config.args
    step = None
    if (ps.available(p.device) and p.dtype in (torch.bfloat16, torch.float16)
            and all(isinstance(b.attn, LinearAttention) for b in model.model.layers) and not a.use_short_conv
            and a.num_kv_groups == 1 and a.feature_map in ("identity", "safe_exp") and a.attn_norm == "rmsnorm"
            and a.use_output_gate and a.gate_low_rank_dim > 0):
        w = persistent_weights(model)
        if not ps.StepShape.of(w["layers"], w["emb"], w["head"], w["heads"]).problems():
            with torch.no_grad():
                step = ps.PersistentStep(**w)
    model._persistent_step, model._persistent_key = step or False, key
    return step


def persistent_weights(model) -> dict:
    """``PersistentStep``'s arguments from a regla/gla model: each layer's weights by the names
    its kernel streams them under, the embedding, the head, the final norm, the heads and the
    layer math (what ``persistent_step`` builds it from; any device)."""
    a = model.config.args
    layers = []
    for b in model.model.layers:
        at = b.attn
        ly = dict(q=at.q_proj.weight, k=at.k_proj.weight, v=at.v_proj.weight, out_gate=at.g_proj.weight,
                  gate_f=at.gk_proj[0].weight, gate_f2=at.gk_proj[1].weight, gate_f_bias=at.gk_proj[1].bias,
                  o=at.o_proj.weight, head_norm=getattr(at, a.norm_name).weight, attn_norm=b.attn_norm.weight,
                  mlp_norm=b.mlp_norm.weight, mlp_gate=b.mlp.gate_proj.weight, mlp_up=b.mlp.up_proj.weight,
                  mlp_down=b.mlp.down_proj.weight)
        if a.use_refining_gate:
            ly.update(gate_r=at.gr_proj[0].weight, gate_r2=at.gr_proj[1].weight, gate_r_bias=at.gr_proj[1].bias)
        layers.append({k: None if v is None else v.detach() for k, v in ly.items()})
    math = dict(eps=a.norm_eps, scale=a.scale, gate_logit_normalizer=a.gate_logit_normalizer, clamp_min=a.clamp_min,
                safe_exp=a.feature_map == "safe_exp")
    return dict(layers=layers, emb=model.model.embeddings.weight.detach(), head=model.head_weight().detach(),
                final_norm=model.model.norm.weight.detach(), heads=a.num_heads, math=math)


class GraphStep:
    """The model's one-token decode step, compiled and captured once as a CUDA graph, then
    replayed per token.

    A step of a linear-attention model is a few dozen small kernels per layer; at batch 1 their
    launches, not the GPU, set the speed. ``torch.compile`` first fuses each layer's elementwise
    work (norms, gates, casts) into a few kernels; the graph then removes the launches. Every
    layer keeps a fixed-size state, so the whole step runs from fixed addresses: the token is
    read from ``self.ids``, the states are the cache's own tensors (the decode kernel updates
    the big one in place, the small ones are copied back into place inside the graph) and the
    logits land in ``self.logits``. Softmax layers grow a KV cache and cannot be captured: see
    ``supported``. ``compile=False`` captures the eager step (no compile time, more kernels).
    """

    def __init__(self, model, cache, batch_size: int, compile: bool = True):
        import torch

        self.model, self.cache = model, cache
        device = next(model.parameters()).device
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.states = [tuple(st) for st in cache.states]
        # at batch 1, the whole step as one kernel where the model allows it (``persistent_step``)
        self.persistent = persistent_step(model) if batch_size == 1 else None
        self.forward = _compiled_decode() if compile and self.persistent is None else _decode
        saved = [tuple(None if x is None else x.clone() for x in st) for st in self.states]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels outside the capture
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        if self.persistent is not None:  # its warm-up steps finished with every count seen
            self.persistent.check()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        for st, keep in zip(self.states, saved):  # undo the warm-up's steps
            for x, y in zip(st, keep):
                if x is not None:
                    x.copy_(y)

    @staticmethod
    def supported(model, cache) -> bool:
        from .ops.utils import use_triton

        p = next(model.parameters())
        return (p.is_cuda and use_triton(p) and all(cache.is_linear)
                and all(st is not None for st in cache.states))

    def _step(self):
        import torch

        if self.persistent is not None:  # the states in place
            return self.persistent(self.ids, self.states)
        with torch.no_grad():
            logits, new = self.forward(self.model, self.ids, self.states)
        for old, st in zip(self.states, new):
            for x, y in zip(old, st):
                if x is not None and y.data_ptr() != x.data_ptr():
                    x.copy_(y)
        return logits

    def __call__(self, ids):
        """Logits [B, vocab] after feeding ``ids`` [B, 1] (advances the cache one token); ``ids``
        may be ``self.ids`` itself, sampled into it (one copy kernel less)."""
        if ids is not self.ids:
            self.ids.copy_(ids)
        self.graph.replay()
        self.cache.seen_tokens += 1
        return self.logits


def stream_tokens(model, ids, cache, max_tokens, sampling, eos=(), context=()):
    """Token ids from the PyTorch model, one cached step each (O(1) per token for linear layers).

    Sampling is transformers' own logits processors, run where the logits are. On CUDA the
    one-token step of an all-linear model runs as a CUDA graph (``GraphStep``) one token ahead:
    the token is sampled into the next step's input on the GPU and that step is queued before
    the token reaches the host (copied on a side stream, off the steps' path), so the host's work
    per token (the stop checks, the caller's streaming) overlaps the GPU's next step instead of
    leaving it idle between steps.

    What the cache has read when the loop ends: never the token that reaches ``max_tokens``
    (nothing runs ahead of it); on the graph path, the last yielded token in every other case
    (an ``eos``, or the caller stopping); on the others, never the last yielded token.
    ``cache.seen_tokens`` counts what it has read, so a caller feeds the rest next time.
    """
    import torch
    from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopPLogitsWarper)

    temp = sampling.get("temp", 0.0)
    procs = LogitsProcessorList()
    if sampling.get("repetition_penalty", 1.0) not in (None, 1.0):
        procs.append(RepetitionPenaltyLogitsProcessor(sampling["repetition_penalty"]))
    if temp > 0:
        procs.append(TemperatureLogitsWarper(temp))
        if 0 < sampling.get("top_p", 0.0) < 1:
            procs.append(TopPLogitsWarper(sampling["top_p"]))
        if sampling.get("min_p", 0.0) > 0:
            procs.append(MinPLogitsWarper(sampling["min_p"]))
    device = next(model.parameters()).device
    recent = list(context) + list(ids)
    if max_tokens < 1:
        return

    def sample(logits, out=None):  # [1, 1] on the device; no host sync (multinomial checks asynchronously)
        logits = logits.float()
        # the same 20-token window mlx-lm's repetition penalty looks at
        scores = procs(torch.tensor([recent[-20:]], device=device), logits) if procs else logits
        if temp > 0:
            return torch.multinomial(torch.softmax(scores, -1), 1, out=out)
        return torch.argmax(scores, -1, keepdim=True, out=out)

    with torch.no_grad():
        logits = model(torch.tensor([list(ids)], device=device), cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
    step = None
    host = torch.empty(1, 1, dtype=torch.long, pin_memory=device.type == "cuda")
    for i in range(max_tokens):
        x = sample(logits, None if step is None else step.ids)  # straight into the next step's input
        last = i + 1 == max_tokens
        if step is None and not last and GraphStep.supported(model, cache):
            step, copier = GraphStep(model, cache, 1), torch.cuda.Stream()
        if step is not None:
            # the token goes to the host on a side stream, so the next step, queued right behind
            # the sampling, does not wait for the copy (on the H200, 15th session: 826 us a token
            # with no copy to the host, 836 us with it queued between the sampling and the step)
            copier.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(copier):
                host.copy_(x, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(copier)
            if not last:
                logits = step(x)  # the GPU goes on while the host waits for the copy
            copied.synchronize()
            tok = int(host)
        else:
            tok = int(x)
        yield tok
        if tok in eos or last:
            return
        recent.append(tok)
        if step is None:
            with torch.no_grad():
                logits = model(x, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


class ChatSession:
    """The PyTorch twin of ``regla_mlx.ChatSession``: the conversation lives in a RecurrentCache
    and each turn feeds only its new tokens (plus the previous answer's last token)."""

    def __init__(self, model, tokenizer, max_tokens, sampling, model_path=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.sampling = max_tokens, sampling
        self.model_path = model_path  # recorded in saved sessions
        self.use_template = bool(getattr(tokenizer, "chat_template", None))
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.reset()

    def reset(self):
        self.cache = self.model.make_cache()
        self.history, self.consumed, self.pending, self.seen = [], "", [], []
        self.turns, self.ended = 0, False  # answers so far; whether the last one ended with EOS

    def save(self, path):
        """The conversation's state as a safetensors file: every layer's state tensors (the same
        states as MLX's prompt-cache file), the token the cache has yet to read, and the session
        metadata (constant size for linear layers)."""
        from safetensors.torch import save_file

        tensors, layout = {}, []
        for i, st in enumerate(self.cache.states):
            layout.append(None if st is None else [x is not None for x in st])
            for j, x in enumerate(st or ()):
                if x is not None:
                    tensors[f"layers.{i}.{j}"] = x.detach().contiguous().cpu()
        meta = session_metadata("torch", self.model.args, self.model_path, self.turns, self.ended,
                                self.seen[-CONTEXT:], self.pending)
        meta.update(layout=json.dumps(layout), seen_tokens=str(self.cache.seen_tokens))
        return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def load(self, path):
        """Resume a conversation saved by ``save``; refuses a file of another model or backend."""
        from pathlib import Path

        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise SessionError(f"{path}: no such session file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise SessionError(f"{path} cannot be read as a session ({e}); was it written completely?") from None
        fields = check_session(meta, "torch", self.model.args, path)
        layout = json.loads(meta["layout"])
        if len(layout) != len(self.cache.states):
            raise SessionError(f"{path} holds {len(layout)} layers' states, this model has {len(self.cache.states)}")
        device = next(self.model.parameters()).device
        self.reset()
        self.cache.states = [None if slots is None else tuple(
            tensors[f"layers.{i}.{j}"].to(device) if present else None for j, present in enumerate(slots))
            for i, slots in enumerate(layout)]
        self.cache.seen_tokens = int(meta["seen_tokens"])
        self.turns, self.ended = fields["turns"], fields["ended"]
        self.seen, self.pending = fields["context"], fields["pending"]
        if self.use_template and self.turns:
            self.history, self.consumed = resumed_history(self.tokenizer, self.ended)

    def _run(self, ids, consumed, on_text, message=None):
        import time

        import torch
        from transformers import TextStreamer

        class Streamer(TextStreamer):
            def on_finalized_text(self, text, stream_end=False):
                if text and on_text is not None:
                    on_text(text)

        streamer = Streamer(self.tokenizer, skip_special_tokens=True)
        feed = self.pending + ids
        # references suffice: decode updates states in place, but only those the turn's prefill
        # made (after the first turn its feed is the pending token plus the new ones, 2 or more)
        snap = (list(self.cache.states), self.cache.seen_tokens)
        gen, stop, interrupted = [], False, False
        start = time.perf_counter()
        try:
            for tok in stream_tokens(self.model, feed, self.cache, self.max_tokens, self.sampling,
                                     self.eos, self.seen):
                if tok in self.eos:
                    stop = True
                    gen.append(tok)
                    break
                gen.append(tok)
                streamer.put(torch.tensor([tok]))
        except KeyboardInterrupt:
            interrupted = True
            # a step cut short may have updated some layers only: back to the turn's start
            self.cache.states, self.cache.seen_tokens = snap
        streamer.end()
        seconds = time.perf_counter() - start
        text = self.tokenizer.decode([t for t in gen if t not in self.eos], skip_special_tokens=True)
        n = len(gen) - (1 if stop else 0)
        if message is not None:
            # what the cache has not read of this turn (after Ctrl-C: all of it; otherwise none
            # or the last token, see stream_tokens) is fed first next turn
            self.pending = (feed + gen)[self.cache.seen_tokens - snap[1]:]
            self.seen += ids + gen
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
            self.consumed = consumed + text + ((self.tokenizer.eos_token or "") if stop else "")
            self.turns, self.ended = self.turns + 1, stop
        return Turn(text, n, seconds, "stop" if stop else "length", interrupted, n / seconds if seconds > 0 else 0.0,
                    len(feed))

    def ask(self, message, on_text=None):
        if self.use_template:
            delta, consumed = chat_delta(self.tokenizer, self.history, message, self.consumed)
            ids = self.tokenizer.encode(delta, add_special_tokens=False)
        else:
            first = not self.seen and not self.pending
            delta = message if first else "\n" + message
            ids, consumed = self.tokenizer.encode(delta, add_special_tokens=first), self.consumed + delta
        return self._run(ids or self.tokenizer.encode(" ", add_special_tokens=False), consumed, on_text, message)

    def complete(self, prompt, on_text=None):
        self.reset()
        return self._run(self.tokenizer.encode(prompt), "", on_text)
