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
    min_p: float = typer.Option(0.0, help="Min-p sampling threshold (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="Penalty for recently used tokens (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Random seed, for reproducible sampling."),
    backend: str = typer.Option("mlx", help="mlx or torch (on CUDA when available)."),
):
    """Interactive streaming chat; the conversation lives in the recurrent state."""
    import sys

    sampling = dict(temp=temp, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    session = _open_session(_model_path(model), backend, max_tokens, sampling, seed)
    mode = "chat template" if session.use_template else "plain continuation (no chat template)"
    typer.secho(f"regla chat: {backend} backend, {mode}. /reset clears the conversation, /quit or "
                "Ctrl-D exits, Ctrl-C stops an answer.", dim=True)

    def show(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        try:
            line = input(">>> ")
        except EOFError:
            typer.echo()
            break
        except KeyboardInterrupt:
            typer.echo("\n(Ctrl-D or /quit to leave)")
            continue
        msg = line.strip()
        if not msg:
            continue
        if msg in ("/quit", "/exit"):
            break
        if msg == "/reset":
            session.reset()
            typer.secho("(conversation cleared)", dim=True)
            continue
        turn = session.ask(msg, on_text=show)
        typer.echo()
        note = ", interrupted" if turn.interrupted else ""
        typer.secho(f"[{turn.tokens} tokens, {turn.tokens_per_second:.1f} tokens/s{note}]", dim=True)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint folder or hub repo id."),
    max_tokens: int = typer.Option(128, help="Most new tokens."),
    temp: float = typer.Option(0.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(0.0, help="Nucleus sampling threshold (0 = off)."),
    min_p: float = typer.Option(0.0, help="Min-p sampling threshold (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="Penalty for recently used tokens (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Random seed, for reproducible sampling."),
    backend: str = typer.Option("mlx", help="mlx or torch (on CUDA when available)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print prompt and generation speed."),
):
    """One-shot generation from a prompt."""
    import sys
    import time

    sampling = dict(temp=temp, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    session = _open_session(_model_path(model), backend, max_tokens, sampling, seed)

    def show(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    start = time.perf_counter()
    turn = session.complete(prompt, on_text=show)
    typer.echo()
    if verbose:
        typer.secho(f"prompt: {turn.prompt_tokens} tokens; generation: {turn.tokens} tokens, "
                    f"{turn.tokens_per_second:.1f} tokens/s; total {time.perf_counter() - start:.2f} s "
                    f"({backend})", dim=True, err=True)


@app.command()
def convert(
    src: str = typer.Argument(..., help="Source checkpoint: folder or hub repo id."),
    dst: Path = typer.Argument(..., help="Output folder (must not exist)."),
    to: str = typer.Option("mlx", help="mlx or hf."),
    dtype: Optional[str] = typer.Option(None, help="bf16, f16 or f32 (default: keep the source's)."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", help="Quantize to this many bits (MLX output; 4 or 8)."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Weights per quantization group."),
):
    """Convert a checkpoint between Hugging Face (PyTorch) and MLX formats."""
    import warnings

    from regla.convert import ConvertError
    from regla.convert import convert as run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            run(src, dst, to=to, dtype=dtype, q_bits=q_bits, q_group_size=q_group_size, log=typer.echo)
        except ConvertError as e:
            fail(str(e))
        except ImportError as e:
            fail(f"{e.name or e} is not installed: `pip install 'regla[mlx]'` for MLX output or quantized "
                 "sources")
    for w in caught:
        typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, help="Training/model config (JSON); flags given override it."),
    data: Optional[List[Path]] = typer.Option(None, help="Text/JSONL files or folders, or token .bin/.npy "
                                              "files (memory-mapped). Repeat for several."),
    val_data: Optional[List[Path]] = typer.Option(None, help="Held-out files (default: the corpus' last "
                                                  "--val-fraction)."),
    tokenizer: Optional[str] = typer.Option(None, help="bytes (built in), bpe:N (learned on the text), or a "
                                            "tokenizer folder / hub id. Default: the --init-from checkpoint's, else bytes."),
    out: Optional[Path] = typer.Option(None, help="Run folder: checkpoints, log.jsonl, final/."),
    preset: Optional[str] = typer.Option(None, help="tiny, 10m, 15m, 40m, 125m, 350m, 760m, 1.3b."),
    attn_type: Optional[str] = typer.Option(None, help="regla, gla or gsa."),
    softmax_layers: Optional[str] = typer.Option(None, help="Comma-separated indices of softmax layers "
                                                 "(hybrid stacks), e.g. 1,3."),
    model_json: Optional[str] = typer.Option(None, "--model", help="Model fields as JSON, e.g. "
                                             "'{\"feature_map\": \"elu\"}'."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-step and process."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-steps per optimizer step."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    time_limit: Optional[float] = typer.Option(None, help="Seconds; shortens max_steps to fit, measured "
                                               "after 25 steps."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    warmup_steps: Optional[int] = typer.Option(None),
    weight_decay: Optional[float] = typer.Option(None),
    grad_clip: Optional[float] = typer.Option(None, help="Max gradient norm (0: off)."),
    eval_interval: Optional[int] = typer.Option(None, help="Steps between validation runs."),
    eval_batches: Optional[int] = typer.Option(None),
    save_interval: Optional[int] = typer.Option(None, help="Steps between checkpoints."),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, help="Autocast: auto (bf16 on CUDA), bf16, fp32."),
    export_dtype: Optional[str] = typer.Option(None, help="dtype of OUT/final: fp32, bf16, fp16."),
    max_shard_size: Optional[str] = typer.Option(None, help="Shard size of saved weights, e.g. 15MB."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard with FSDP instead of DDP (under torchrun)."),
    init_from: Optional[Path] = typer.Option(None, help="Start from this regla checkpoint (its config, weights "
                                             "and, by default, tokenizer), e.g. `regla linearize`'s output."),
    stage: Optional[str] = typer.Option(None, help="lm (next-token loss, default), kl (match --teacher's "
                                        "logits) or transfer (match --teacher's softmax attention layer by layer)."),
    teacher: Optional[Path] = typer.Option(None, help="regla checkpoint giving the kl/transfer targets (for "
                                           "transfer: softmax where the student is linear, e.g. "
                                           "`regla linearize SRC T --softmax-layers all`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT's last checkpoint."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Plain log lines instead of a progress bar."),
):
    """Train a model with PyTorch (CUDA or CPU); under torchrun, on many GPUs."""
    import json

    from regla_torch.train import TrainConfig, TrainError, train as run_train

    try:
        if config:
            cfg = TrainConfig.from_json(config)
        elif resume and out is not None and (out / "train_config.json").exists():
            cfg = TrainConfig.from_json(out / "train_config.json")  # the run's own settings
        else:
            cfg = TrainConfig()
        flags = dict(val_data=val_data, tokenizer=tokenizer, out=out, preset=preset, seq_len=seq_len,
                     batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, time_limit=time_limit,
                     lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
                     eval_interval=eval_interval, eval_batches=eval_batches, save_interval=save_interval,
                     seed=seed, device=device, dtype=dtype, export_dtype=export_dtype,
                     max_shard_size=max_shard_size, data=data, init_from=init_from, stage=stage, teacher=teacher)
        for k, v in flags.items():
            if v is None or v == []:
                continue  # not given: keep the config file's value or the default
            setattr(cfg, k, [str(p) for p in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v)
        model = dict(cfg.model)
        if model_json:
            try:
                model.update(json.loads(model_json))
            except json.JSONDecodeError as e:
                fail(f"--model is not valid JSON ({e})")
        if attn_type:
            model["attn_type"] = attn_type
        if softmax_layers is not None:
            try:
                model["softmax_layers"] = [int(i) for i in softmax_layers.split(",") if i.strip()]
            except ValueError:
                fail(f"--softmax-layers takes comma-separated integers, not {softmax_layers!r}")
        cfg.model = model
        cfg.fsdp = cfg.fsdp or fsdp
        cfg.resume = cfg.resume or resume
        cfg.progress = cfg.progress and not no_progress
        run_train(cfg)
    except TrainError as e:
        fail(str(e))


@app.command()
def bench():
    """Run the op benchmarks of this machine's backend."""
    not_available("bench")


@app.command()
def parity(
    model: str = typer.Argument(..., help="Checkpoint folder or hub repo id."),
    prompt: str = typer.Option("The quick brown fox jumps over the lazy dog.", help="Prompt to run."),
    greedy_tokens: int = typer.Option(16, help="Greedy tokens to compare."),
    spec_max_params: float = typer.Option(50e6, help="Run the float64 spec only below this many parameters."),
):
    """Run one prompt through both backends (and the spec) and report the gap."""
    import numpy as np

    try:
        import mlx.core as mx
        import torch

        import regla_mlx
        import regla_torch
    except ImportError as e:
        fail(f"parity needs both backends; {e.name} is missing (pip install 'regla[mlx]' torch)")
    from regla import checkpoint, spec

    try:
        folder = checkpoint.resolve(model)
        if checkpoint.read_config(folder).get("quantization"):
            fail(f"{folder} is quantized: run parity on the full-precision checkpoint")
        tm = regla_torch.load(folder).float()
        mm = regla_mlx.load_model(folder, "f32")
    except (checkpoint.CheckpointError, spec.ConfigError) as e:
        fail(str(e))
    args = tm.args
    ids = _prompt_ids(folder, prompt)
    n_params = sum(p.numel() for p in tm.parameters())
    typer.echo(f"{folder}: {args.attn_type}, {args.num_hidden_layers} layers, d={args.hidden_size}, "
               f"{n_params / 1e6:.2f}M parameters; prompt of {len(ids)} tokens")
    with torch.no_grad():
        lt = tm(torch.tensor([ids]), use_cache=False).logits.double().numpy()
    lm = np.array(mm(mx.array([ids])).astype(mx.float32), dtype=np.float64)

    def gap(a, b):
        return float(np.abs(a - b).max()), float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    rows = [("mlx vs torch", *gap(lm, lt))]
    if n_params < spec_max_params:
        w = {k: v.detach().double().numpy() for k, v in tm.state_dict().items()}
        ref, _ = spec.model_forward(w, args, np.array([ids]))
        rows += [("torch vs spec", *gap(lt, ref)), ("mlx vs spec", *gap(lm, ref))]
    else:
        typer.echo(f"(spec skipped: more than {spec_max_params:.0f} parameters)")
    for name, ab, rel in rows:
        typer.echo(f"logits {name:14s} max abs {ab:.3e}  max rel {rel:.3e}")
    from mlx_lm.generate import generate_step

    from regla_torch.generate import stream_tokens

    # No EOS stop on either side: the comparison is of token ids, not of finished answers.
    cont_t = list(stream_tokens(tm, ids, tm.make_cache(), greedy_tokens, {}, eos=()))
    cont_m = [t for t, _ in generate_step(mx.array(ids), mm, max_tokens=greedy_tokens)]
    same = cont_t[:len(cont_m)] == cont_m[:len(cont_t)]
    first = next((i for i, (a, b) in enumerate(zip(cont_t, cont_m)) if a != b), None)
    typer.echo(f"greedy {greedy_tokens} tokens: torch {cont_t}")
    typer.echo(f"                  mlx   {cont_m}")
    ok = same and max(r[2] for r in rows) < 1e-3
    typer.echo(("agree" if same else f"DIFFER from token {first}") + ("; parity ok" if ok else "; PARITY FAILED"))
    if not ok:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------------
# Helpers of chat / generate / parity. Backends are imported inside them, never at module level.

def _model_path(model: Optional[str]) -> str:
    if model is not None:
        return model
    bundled = Path(__file__).resolve().parent / "default_model"
    if not (bundled / "config.json").is_file():
        fail("no default model is bundled with this install of regla: pass --model PATH_OR_HUB_REPO "
             "(e.g. a folder written by `regla convert`)")
    return str(bundled)


def _open_session(path: str, backend: str, max_tokens: int, sampling: dict, seed: Optional[int]):
    from regla.checkpoint import CheckpointError
    from regla.spec import ConfigError

    if backend not in ("mlx", "torch"):
        fail(f"--backend {backend!r}: choose mlx or torch")
    try:
        if backend == "mlx":
            import mlx.core as mx

            import regla_mlx

            if seed is not None:
                mx.random.seed(seed)
            model, tokenizer = regla_mlx.load(path)
            return regla_mlx.ChatSession(model, tokenizer, max_tokens, sampling)
        import torch

        import regla_torch
        from regla_torch.generate import ChatSession, load_tokenizer

        if seed is not None:
            torch.manual_seed(seed)
        # on an NVIDIA GPU when there is one: Triton kernels and the CUDA-graph decode step
        device = "cuda" if torch.cuda.is_available() else None
        return ChatSession(regla_torch.load(path, device=device), load_tokenizer(path), max_tokens, sampling)
    except ImportError as e:
        fail(f"the {backend} backend is not installed ({e.name} missing): "
             + ("pip install 'regla[mlx]'" if backend == "mlx" else "pip install torch") + ", or use --backend "
             + ("torch" if backend == "mlx" else "mlx"))
    except (CheckpointError, ConfigError) as e:
        fail(str(e))


def _prompt_ids(folder, prompt: str) -> list:
    try:
        from regla_torch.generate import load_tokenizer

        return list(load_tokenizer(folder).encode(prompt))
    except Exception:  # no usable tokenizer: parity only needs some valid ids
        from regla import checkpoint

        vocab = checkpoint.read_args(folder).vocab_size
        return [b % vocab for b in prompt.encode()]


@app.command()
def linearize(
    src: Path = typer.Argument(..., help="A transformers Llama-family model folder (Llama, Mistral, Qwen2, "
                               "SmolLM) or a GGUF file of one."),
    dst: Path = typer.Argument(..., help="Output folder (must not exist): a regla checkpoint."),
    attn_type: str = typer.Option("regla", help="regla, gla or gsa: the type of every layer not kept softmax."),
    softmax_layers: str = typer.Option("none", help="Layers kept as softmax attention: comma-separated "
                                       "indices, 'all' (reproduces the teacher) or 'none'."),
    model_json: Optional[str] = typer.Option(None, "--model", help="Model fields over the derived ones, as "
                                             "JSON, e.g. '{\"use_output_gate\": true}'."),
    dtype: str = typer.Option("fp32", help="Weights' dtype: fp32, bf16 or fp16."),
    seed: int = typer.Option(0, help="Seed of the new (gate) weights."),
):
    """Turn a pretrained Llama-family Transformer into a regla model (then recover it with
    `regla train --init-from DST --stage transfer|kl|lm`)."""
    import json
    import warnings

    try:
        from regla_torch.linearize import LinearizeError, linearize as run, parse_layers
    except ImportError as e:
        fail(f"{e.name} is not installed: linearize needs PyTorch and transformers")
    try:
        model = json.loads(model_json) if model_json else None
    except json.JSONDecodeError as e:
        fail(f"--model is not valid JSON ({e})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            run(src, dst, attn_type=attn_type, softmax_layers=parse_layers(softmax_layers), model=model,
                dtype=dtype, seed=seed, log=typer.echo)
        except LinearizeError as e:
            fail(str(e))
    for w in caught:
        if "linear layers" in str(w.message):
            typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)


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

        from regla_torch.loading import model_from_weights

        def run_torch(args, w, ids):
            m = model_from_weights(args, {k: torch.from_numpy(v) for k, v in w.items()}).eval()
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
            m.load_weights([(k, mx.array(v)) for k, v in w.items()], strict=True)
            return np.array(m(mx.array(ids)), dtype=np.float64)

        yield "mlx", run_mlx
    except ImportError:
        pass


if __name__ == "__main__":
    app()
