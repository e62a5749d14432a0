"""Saved chats: file size after 100 and after 10,000 tokens of conversation, and load time.

    python bench/bench_sessions.py [--model FOLDER] [--tokens 100 10000]

A regla chat (MLX, the shipped model unless --model) is driven with generated turns until the
state has read each token count, saved with ``ChatSession.save`` (mlx-lm's prompt-cache
format) and loaded back; beside it, mlx-lm's own Llama of the same shape (random weights)
saves its KV cache for the same token counts with ``save_prompt_cache``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TURNS = ["Tell me about the beginning.", "And then what happened?", "Who wrote the book of Psalms?",
         "def main():", "Explain the for statement.", "What does the Lord say?"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "regla" / "default_model")
    ap.add_argument("--tokens", type=int, nargs="+", default=[100, 10000])
    a = ap.parse_args()
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

    import regla_mlx
    from bench_serving import llama_twin
    from regla.convert import convert

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = convert(a.model, tmp / "regla", log=lambda *_: None)
        model, tok = regla_mlx.load(folder)
        s = regla_mlx.ChatSession(model, tok, 64, {"temp": 0.0}, model_path=str(folder))
        i = 0
        for n in sorted(a.tokens):
            while len(s.tokens) < n:
                s.ask(TURNS[i % len(TURNS)])
                i += 1
            f = s.save(tmp / f"regla_{n}.safetensors")
            t = time.perf_counter()
            r = regla_mlx.ChatSession(model, tok, 64, {"temp": 0.0})
            r.load(f)
            mx.eval([c.state for c in r.cache])
            rows.append(("regla chat session", len(s.tokens), f.stat().st_size, time.perf_counter() - t))
        twin = llama_twin(folder, tmp / "llama")
        from mlx_lm import load

        lm, _ = load(str(twin))
        ids = mx.array([s.tokens])
        for n in sorted(a.tokens):
            c = make_prompt_cache(lm)
            for j in range(0, n, 512):
                lm(ids[:, j:min(j + 512, n)], cache=c)
            f = tmp / f"llama_{n}.safetensors"
            save_prompt_cache(str(f), c, {"model": str(twin), "tokenizer_config": "{}"})
            rows.append(("mlx-lm llama KV cache, same shape", n, f.stat().st_size, None))
    print(f"model: {a.model.name} ({model.args.attn_type}, d={model.args.hidden_size}, "
          f"{model.args.num_hidden_layers} layers); device {mx.default_device()}")
    print("| state | tokens read | file size | load time |")
    print("|---|---|---|---|")
    for name, n, size, dt in rows:
        print(f"| {name} | {n:,} | {size:,} B | " + ("-" if dt is None else f"{dt * 1000:.1f} ms") + " |")


if __name__ == "__main__":
    main()
