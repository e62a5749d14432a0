"""Train a tiny ReGLA model with PyTorch, convert it to MLX, and check that both backends
continue a prompt with the same greedy tokens.

    python examples/train_tiny_then_chat.py [WORK_DIR] [--steps 60]

Runs on a CPU in about a minute (on a CUDA machine the same code trains on the GPU); on a
Mac the MLX half uses the Metal kernels. The same steps from the shell:

    regla train --data corpus.jsonl --preset tiny --seq-len 64 --max-steps 60 --out run
    regla convert run/final run-mlx --to mlx
    regla generate --model run-mlx --prompt "the cat"
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

PROMPT = "the cat sat on"

# A little corpus with strong regularities, so a few dozen steps learn something visible.
SENTENCES = [
    "the cat sat on the mat and looked at the dog.",
    "the dog sat on the rug and looked at the cat.",
    "a bird sang in the tree while the sun rose over the hill.",
    "the old man walked to the river and sat on a stone.",
    "the children ran across the field and laughed in the rain.",
]


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    with open(path, "w") as fh:
        for i in range(200):  # documents of 3 sentences, in varying order
            doc = " ".join(SENTENCES[(i * k) % len(SENTENCES)] for k in (1, 2, 3))
            fh.write(json.dumps({"text": doc}) + "\n")
    return path


def train_tiny(work: Path, steps: int = 60) -> Path:
    """Train with `regla train`'s loop; returns the exported Hugging Face folder."""
    from regla_torch.train import TrainConfig, train

    cfg = TrainConfig(data=[str(write_corpus(work / "data"))], out=str(work / "run"), preset="tiny",
                      tokenizer="bytes", seq_len=64, batch_size=8, max_steps=steps, lr=3e-3,
                      warmup_steps=5, eval_interval=steps, save_interval=steps, progress=False)
    metrics = train(cfg)
    print(f"trained {steps} steps: loss {metrics['loss']:.3f}, validation perplexity {metrics['val_ppl']:.2f}")
    return work / "run" / "final"


def to_mlx(hf_folder: Path, work: Path) -> Path:
    from regla.convert import convert

    return convert(hf_folder, work / "mlx", to="mlx")


def torch_greedy(folder: Path, prompt: str, n: int) -> list[int]:
    """Greedy continuation with transformers' generate() on the torch model."""
    import torch
    from transformers import AutoTokenizer

    import regla_torch

    model = regla_torch.load(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def mlx_greedy(folder: Path, prompt: str, n: int) -> list[int]:
    """Greedy continuation with the MLX model: prompt once, then one token at a time through
    the recurrent cache."""
    import mlx.core as mx

    from regla_mlx import load

    model, tok = load(folder)
    cache = model.make_cache()
    x = mx.array([tok.encode(prompt)])
    out = []
    for _ in range(n):
        logits = model(x, cache=cache)[:, -1]
        nxt = int(mx.argmax(logits, axis=-1).item())
        out.append(nxt)
        x = mx.array([[nxt]])
    return out


def main(work: Path, steps: int = 60, n: int = 24):
    hf = train_tiny(work, steps)
    mlx_folder = to_mlx(hf, work)
    a, b = torch_greedy(hf, PROMPT, n), mlx_greedy(mlx_folder, PROMPT, n)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    print(f"torch: {PROMPT!r} -> {tok.decode(a)!r}")
    print(f"mlx:   {PROMPT!r} -> {tok.decode(b)!r}")
    if a != b:
        raise SystemExit(f"the backends disagree: torch {a} vs mlx {b}")
    print(f"the first {n} greedy tokens agree")
    return a, b, tok.decode(a)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", nargs="?", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    if a.work is None:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d), a.steps)
    else:
        main(a.work, a.steps)
