"""The ``regla`` command. Each command imports its backend only when it runs, so
``regla --help`` is instant and works with one backend installed."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="regla",
    help="ReGLA / GLA / GSA language models: chat on a Mac (MLX), train on CUDA (PyTorch), "
         "convert checkpoints between them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(msg: str, code: int = 1):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def not_available(what: str):
    fail(f"`regla {what}` is not available yet in this version.", code=2)


@app.command()
def chat(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint folder or hub repo id "
                                        "(default: the small model shipped in the package)."),
    max_tokens: int = typer.Option(512, help="Most tokens per answer."),
    temp: float = typer.Option(0.7, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling threshold."),
    backend: str = typer.Option("mlx", help="mlx or torch."),
):
    """Interactive streaming chat; the conversation lives in the recurrent state."""
    not_available("chat")


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint folder or hub repo id."),
    max_tokens: int = typer.Option(128, help="Most new tokens."),
    temp: float = typer.Option(0.0, help="Sampling temperature (0 = greedy)."),
    backend: str = typer.Option("mlx", help="mlx or torch."),
):
    """One-shot generation from a prompt."""
    not_available("generate")


@app.command()
def convert(
    src: str = typer.Argument(..., help="Source checkpoint: folder or hub repo id."),
    dst: Path = typer.Argument(..., help="Output folder (must not exist)."),
    to: str = typer.Option("mlx", help="mlx or hf."),
):
    """Convert a checkpoint between Hugging Face (PyTorch) and MLX formats."""
    not_available("convert")


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, help="Model/training config (JSON)."),
    data: Optional[Path] = typer.Option(None, help="Text/JSONL files or a token .bin/.npy."),
):
    """Train a model with PyTorch (CUDA or CPU)."""
    not_available("train")


@app.command()
def bench():
    """Run the op benchmarks of this machine's backend."""
    not_available("bench")


@app.command()
def parity(model: str = typer.Argument(..., help="Checkpoint folder or hub repo id.")):
    """Run one prompt through both backends (and the spec) and report the gap."""
    not_available("parity")


@app.command()
def linearize(src: str = typer.Argument(...), dst: Path = typer.Argument(...)):
    """Turn a Llama-family transformers checkpoint into a regla one."""
    not_available("linearize")


@app.command("spec-check")
def spec_check(
    attn_type: List[str] = typer.Option(["regla", "gla", "gsa"], help="Layer types to check."),
    seed: int = typer.Option(0),
):
    """Quick self-check: random tiny models through the spec and every installed backend."""
    import numpy as np

    from regla import spec

    for at in attn_type:
        args = spec.ModelArgs(attn_type=at, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2,
                              num_slots=8, softmax_layers=[1])
        w = spec.init_weights(args, seed, std=0.3)
        ids = np.random.default_rng(seed).integers(0, 64, (1, 20))
        ref, _ = spec.model_forward(w, args, ids)
        for name, run in _backends():
            out = run(args, w, ids)
            gap = float(np.abs(out - ref).max() / np.abs(ref).max())
            typer.echo(f"{at:6s} {name:6s} max rel gap {gap:.2e}  {'ok' if gap < 1e-4 else 'MISMATCH'}")


def _backends():
    import numpy as np

    try:
        import torch

        from regla_torch import ReGLAConfig, ReGLAForCausalLM

        def run_torch(args, w, ids):
            m = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).eval()
            sd = {k: torch.from_numpy(v) for k, v in w.items()}
            m.load_state_dict(sd, strict=False)
            with torch.no_grad():
                return m(torch.from_numpy(ids), use_cache=False).logits.double().numpy()

        yield "torch", run_torch
    except ImportError:
        pass
    try:
        import mlx.core as mx

        from regla_mlx.model import Model

        def run_mlx(args, w, ids):
            m = Model(args)
            m.load_weights([(k, mx.array(v)) for k, v in w.items()])
            return np.array(m(mx.array(ids)), dtype=np.float64)

        yield "mlx", run_mlx
    except ImportError:
        pass


if __name__ == "__main__":
    app()
