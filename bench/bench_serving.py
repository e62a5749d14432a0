"""Serving throughput: stock ``mlx_lm.server`` on a converted regla folder against a stock
mlx-lm Llama of about the same size, at 1, 8 and 32 concurrent requests.

    python bench/bench_serving.py [--model FOLDER] [--concurrency 1 8 32] [--max-tokens 64]

--model is a regla checkpoint (default: the model shipped in the package); it is converted
to MLX, and a Llama (mlx-lm's own ``llama`` model type, random weights) is built with the
same width, depth, heads, MLP width, vocabulary and tokenizer. Each server gets the same
greedy requests (prompts of 2 to ~60 tokens); tokens/s = completion tokens of all requests
over the wall time from the first request to the last answer. On a CPU (mlx[cpu]) the
figures say how batching scales, not how fast a Mac is.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["In the beginning", "And God said, Let there be light: and there was light.",
           "def", "The Python tutorial explains how to define a function with the def keyword",
           "Jesus wept.", "import os\nimport sys\n\ndef main(argv):\n    path = os.path.join(", "Lord",
           "Blessed are the meek: for they shall inherit the earth. Blessed are they which do hunger"]


def llama_twin(src: Path, dst: Path):
    """A random-weight mlx-lm Llama shaped like the regla model in ``src`` (MLX folder)."""
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    from regla import checkpoint
    from regla.convert.common import copy_tokenizer

    a = checkpoint.read_args(src)
    cfg = dict(model_type="llama", hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
               intermediate_size=a.mlp_dim, num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads,
               rms_norm_eps=a.norm_eps, vocab_size=a.vocab_size, tie_word_embeddings=a.tie_word_embeddings,
               rope_theta=10000.0)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    dst.mkdir(parents=True)
    save_model(dst, model)
    save_config(cfg, dst / "config.json")
    copy_tokenizer(src, dst)
    return dst


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, prompt, max_tokens):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    for attempt in range(10):
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())["usage"]["completion_tokens"]
        except (ConnectionResetError, ConnectionRefusedError):
            time.sleep(0.1 * (attempt + 1))  # mlx_lm.server's listen backlog is 5
    raise RuntimeError("the server kept resetting connections")


def serve(folder: Path, concurrency, max_tokens):
    port = free_port()
    n = max(concurrency)
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--trust-remote-code",
                             "--host", "127.0.0.1", "--port", str(port), "--decode-concurrency", str(n),
                             "--prompt-concurrency", str(n), "--log-level", "WARNING"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        post(port, PROMPTS[0], 4)  # warm-up
        out = {}
        for c in concurrency:
            jobs = [PROMPTS[i % len(PROMPTS)] for i in range(max(c, 4) if c == 1 else c)]
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                tokens = sum(pool.map(lambda p: post(port, p, max_tokens), jobs))
            out[c] = tokens / (time.perf_counter() - t)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "regla" / "default_model")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    from regla.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        ours = convert(a.model, Path(tmp) / "regla", log=lambda *_: None)
        twin = llama_twin(ours, Path(tmp) / "llama")
        rows = {"regla (converted)": serve(ours, a.concurrency, a.max_tokens),
                "mlx-lm llama, same shape": serve(twin, a.concurrency, a.max_tokens)}
    import mlx.core as mx

    print(f"device: {mx.default_device()}, {os.cpu_count()} CPUs; {a.max_tokens} new tokens per request, greedy")
    print("| model | " + " | ".join(f"{c} concurrent" for c in a.concurrency) + " |")
    print("|---|" + "---|" * len(a.concurrency))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.0f} tok/s" for c in a.concurrency) + " |")


if __name__ == "__main__":
    main()
