"""The ``regla`` command. Each command imports its backend only when it runs, so
``regla --help`` is instant and works with one backend installed."""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from regla.spec import MODEL_TYPES

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


# ----------------------------------------------------------------------------------------------
# Option checks. Each option's rule is written once here and shared by the commands (and so by
# both backends): a bad value is typer's one-line usage error, exit 2, before any model loads.

class Backend(str, Enum):
    mlx = "mlx"
    torch = "torch"


AttnType = Enum("AttnType", {t: t for t in MODEL_TYPES}, type=str)

DTYPES = ("bf16", "f16", "f32")
DTYPE_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}


def _dtype(value: Optional[str]) -> Optional[str]:
    """bf16 | f16 | f32; other common spellings (fp32, float16, ...) mean the same."""
    if value is None:
        return None
    name = DTYPE_ALIASES.get(value.lower(), value.lower())
    if name not in DTYPES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(DTYPES)}")
    return name


def _autocast_dtype(value: Optional[str]) -> Optional[str]:
    return value if value in (None, "auto") else _dtype(value)


def _positive(value):
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value} is not > 0")
    return value


def _one_of(*allowed):
    def check(value):
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value} is not one of {', '.join(map(str, allowed))}")
        return value
    return check


def _not_empty(value: str) -> str:
    if not value.strip():
        raise typer.BadParameter("the prompt is empty: give some text to continue")
    return value


def model_option():
    return typer.Option(None, "--model", "-m", help="Checkpoint folder or hub repo id (default: the small "
                        "model shipped in the package).")


def max_tokens_option(default: int, help: str):
    return typer.Option(default, min=1, help=help)


def temp_option(default: float):
    return typer.Option(default, min=0.0, help="Sampling temperature (0 = greedy).")


def top_p_option(default: float):
    return typer.Option(default, min=0.0, max=1.0, help="Nucleus sampling threshold (0 or 1 = off).")


def min_p_option():
    return typer.Option(0.0, min=0.0, max=1.0, help="Min-p sampling threshold (0 = off).")


def repetition_penalty_option():
    return typer.Option(1.0, callback=_positive, help="Penalty for recently used tokens (> 0; 1 = off).")


def seed_option(default=None):
    return typer.Option(default, min=0, help="Random seed, for reproducible sampling.")


def backend_option():
    return typer.Option(Backend.mlx, case_sensitive=False, help="mlx, or torch (on CUDA when available).")


@contextlib.contextmanager
def busy(message: str):
    """A spinner on stderr while something slow happens before the first output (loading a
    model, importing PyTorch). Only on a terminal: piped or captured output stays clean."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


# ----------------------------------------------------------------------------------------------
# chat

def _chat_help(session, arg):
    for name, (text, _) in CHAT_COMMANDS.items():
        if text:
            typer.secho(f"  {name:8s} {text}", dim=True)
    typer.secho("  A line that starts with // is sent as text with one / (e.g. //etc/hosts).", dim=True)
    return True


def _chat_reset(session, arg):
    session.reset()
    typer.secho("(conversation cleared)", dim=True)
    return True


def _chat_quit(session, arg):
    return False


def _session_file(session, arg):
    path = arg or getattr(session, "session_file", None)
    if not path:
        typer.secho("give a file name, e.g. /save chat.safetensors (or start with --session FILE)",
                    fg=typer.colors.YELLOW)
    return path


def _chat_save(session, arg):
    from regla.chat import SessionError

    path = _session_file(session, arg)
    if path:
        try:
            saved = session.save(path)
            typer.secho(f"(saved to {saved}: {saved.stat().st_size:,} bytes)", dim=True)
        except (SessionError, OSError) as e:
            typer.secho(f"could not save: {e}", fg=typer.colors.YELLOW)
    return True


def _chat_load(session, arg):
    from regla.chat import SessionError

    path = _session_file(session, arg)
    if path:
        try:
            session.load(path)
            typer.secho(f"(loaded {path}: {session.turns} earlier answers in the state)", dim=True)
        except SessionError as e:
            typer.secho(f"could not load: {e}", fg=typer.colors.YELLOW)
    return True


# The chat's slash commands: name -> (help line, or None for an alias; handler(session, argument
# text) returning False to end the chat). New commands are one entry here.
CHAT_COMMANDS = {
    "/help": ("list these commands", _chat_help),
    "/reset": ("forget the conversation and start again", _chat_reset),
    "/save": ("[FILE] save the conversation's state (constant size; default: the --session file)", _chat_save),
    "/load": ("[FILE] continue a saved conversation (default: the --session file)", _chat_load),
    "/quit": ("leave the chat (also /exit or Ctrl-D; Ctrl-C stops an answer)", _chat_quit),
    "/exit": (None, _chat_quit),
}


def chat_command(session, line: str) -> Optional[bool]:
    """Run ``line`` if it is a slash command: True to go on, False to leave; None when ``line``
    is a message for the model."""
    if not line.startswith("/") or line.startswith("//"):
        return None
    name, _, arg = line.partition(" ")
    entry = CHAT_COMMANDS.get(name.lower())
    if entry is None:
        typer.secho(f"unknown command {name}: /help lists the commands; start the line with // to send "
                    "it to the model as text", fg=typer.colors.YELLOW)
        return True
    return entry[1](session, arg.strip())


@app.command()
def chat(
    model: Optional[str] = model_option(),
    max_tokens: int = max_tokens_option(512, "Most tokens per answer."),
    temp: float = temp_option(0.7),
    top_p: float = top_p_option(0.95),
    min_p: float = min_p_option(),
    repetition_penalty: float = repetition_penalty_option(),
    seed: Optional[int] = seed_option(),
    backend: Backend = backend_option(),
    session_file: Optional[Path] = typer.Option(None, "--session", help="Resume the conversation saved in this "
                                                "file if it exists, and save it there on exit (also /save, /load)."),
):
    """Interactive streaming chat; the conversation lives in the recurrent state."""
    import sys

    from regla.chat import SessionError

    if session_file is not None and not session_file.expanduser().absolute().parent.is_dir():
        # checked before the chat starts: finding out on exit would lose the conversation
        fail(f"--session {session_file}: the folder {session_file.parent} does not exist", code=2)
    sampling = dict(temp=temp, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    session = _open_session(_model_path(model), backend.value, max_tokens, sampling, seed)
    session.session_file = session_file
    if session_file is not None and session_file.exists():
        try:
            session.load(session_file)
        except SessionError as e:
            fail(str(e), code=2)
        typer.secho(f"(resumed {session_file}: {session.turns} earlier answers in the state)", dim=True)
    mode = "chat template" if session.use_template else "plain continuation (no chat template)"
    typer.secho(f"regla chat: {backend.value} backend, {mode}. /help lists commands, /reset clears the "
                "conversation, /quit or Ctrl-D exits, Ctrl-C stops an answer.", dim=True)

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
        done = chat_command(session, msg)
        if done is not None:
            if not done:
                break
            continue
        if msg.startswith("//"):
            msg = msg[1:]
        turn = session.ask(msg, on_text=show)
        typer.echo()
        note = ", interrupted" if turn.interrupted else ""
        typer.secho(f"[{turn.tokens} tokens, {turn.tokens_per_second:.1f} tokens/s{note}]", dim=True)
    if session_file is not None:
        _chat_save(session, str(session_file))


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", callback=_not_empty, help="Text to continue."),
    model: Optional[str] = model_option(),
    max_tokens: int = max_tokens_option(128, "Most new tokens."),
    temp: float = temp_option(0.0),
    top_p: float = top_p_option(0.0),
    min_p: float = min_p_option(),
    repetition_penalty: float = repetition_penalty_option(),
    seed: Optional[int] = seed_option(),
    backend: Backend = backend_option(),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print prompt and generation speed."),
):
    """One-shot generation from a prompt."""
    import sys
    import time

    sampling = dict(temp=temp, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    session = _open_session(_model_path(model), backend.value, max_tokens, sampling, seed)

    def show(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    start = time.perf_counter()
    turn = session.complete(prompt, on_text=show)
    typer.echo()
    if verbose:
        typer.secho(f"prompt: {turn.prompt_tokens} tokens; generation: {turn.tokens} tokens, "
                    f"{turn.tokens_per_second:.1f} tokens/s; total {time.perf_counter() - start:.2f} s "
                    f"({backend.value})", dim=True, err=True)


class Target(str, Enum):
    mlx = "mlx"
    hf = "hf"


@app.command()
def convert(
    src: str = typer.Argument(..., help="Source checkpoint: folder or hub repo id."),
    dst: Path = typer.Argument(..., help="Output folder (must not exist)."),
    to: Target = typer.Option(Target.mlx, case_sensitive=False, help="mlx, or hf (PyTorch / transformers)."),
    dtype: Optional[str] = typer.Option(None, callback=_dtype, metavar="[bf16|f16|f32]",
                                        help="Weights' dtype (default: keep the source's)."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", callback=_one_of(2, 3, 4, 6, 8), metavar="[2|3|4|6|8]",
                                         help="Quantize to this many bits (MLX output)."),
    q_group_size: int = typer.Option(64, "--q-group-size", callback=_one_of(32, 64, 128), metavar="[32|64|128]",
                                     help="Weights per quantization group."),
):
    """Convert a checkpoint between Hugging Face (PyTorch) and MLX formats."""
    import warnings

    from regla.convert import ConvertError
    from regla.convert import convert as run

    if q_bits is not None and to is not Target.mlx:
        raise typer.BadParameter("quantization applies to MLX output only: use --to mlx", param_hint="'--q-bits'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            run(src, dst, to=to.value, dtype=dtype, q_bits=q_bits, q_group_size=q_group_size, log=typer.echo)
        except ConvertError as e:
            fail(str(e))
        except ImportError as e:
            need = "mlx" if (e.name or "").startswith("mlx") else "torch"
            fail(f"{e.name or e} is not installed: pip install -e '.[{need}]' (MLX output and quantized sources "
                 "need [mlx]; --to hf needs [torch])")
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
    attn_type: Optional[AttnType] = typer.Option(None, case_sensitive=False, help="Layer type."),
    softmax_layers: Optional[str] = typer.Option(None, help="Comma-separated indices of softmax layers "
                                                 "(hybrid stacks), e.g. 1,3."),
    model_json: Optional[str] = typer.Option(None, "--model", help="Model fields as JSON, e.g. "
                                             "'{\"feature_map\": \"elu\"}'."),
    seq_len: Optional[int] = typer.Option(None, min=2, help="Tokens per sequence."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Sequences per micro-step and process."),
    grad_accum: Optional[int] = typer.Option(None, min=1, help="Micro-steps per optimizer step."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps."),
    time_limit: Optional[float] = typer.Option(None, min=0.0, help="Seconds; shortens max_steps to fit, "
                                               "measured after 25 steps (0: no limit)."),
    lr: Optional[float] = typer.Option(None, callback=_positive, help="Peak learning rate (> 0)."),
    warmup_steps: Optional[int] = typer.Option(None, min=0),
    weight_decay: Optional[float] = typer.Option(None, min=0.0),
    grad_clip: Optional[float] = typer.Option(None, min=0.0, help="Max gradient norm (0: off)."),
    eval_interval: Optional[int] = typer.Option(None, min=1, help="Steps between validation runs."),
    eval_batches: Optional[int] = typer.Option(None, min=1),
    save_interval: Optional[int] = typer.Option(None, min=1, help="Steps between checkpoints."),
    seed: Optional[int] = typer.Option(None, min=0),
    device: Optional[str] = typer.Option(None, callback=_one_of("auto", "cpu", "cuda"), metavar="[auto|cpu|cuda]",
                                         help="Where to train (auto: CUDA when there is a GPU)."),
    dtype: Optional[str] = typer.Option(None, callback=_autocast_dtype, metavar="[auto|bf16|f32]",
                                        help="Autocast: auto (bf16 on CUDA, none on CPU), bf16, or f32 (none)."),
    export_dtype: Optional[str] = typer.Option(None, callback=_dtype, metavar="[f32|bf16|f16]",
                                               help="dtype of OUT/final (default f32)."),
    max_shard_size: Optional[str] = typer.Option(None, help="Shard size of saved weights, e.g. 15MB."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard with FSDP instead of DDP (under torchrun)."),
    init_from: Optional[Path] = typer.Option(None, help="Start from this regla checkpoint (its config, weights "
                                             "and, by default, tokenizer), e.g. `regla linearize`'s output."),
    stage: Optional[str] = typer.Option(None, callback=_one_of("lm", "kl", "transfer"), metavar="[lm|kl|transfer]",
                                        help="lm (next-token loss, default), kl (match --teacher's "
                                        "logits) or transfer (match --teacher's softmax attention layer by layer)."),
    teacher: Optional[Path] = typer.Option(None, help="regla checkpoint giving the kl/transfer targets (for "
                                           "transfer: softmax where the student is linear, e.g. "
                                           "`regla linearize SRC T --softmax-layers all`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT's last checkpoint."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Plain log lines instead of a progress bar."),
):
    """Train a model with PyTorch (CUDA or CPU); under torchrun, on many GPUs."""
    import json

    cfg = None
    with busy("starting: importing PyTorch"):
        try:
            from regla_torch.train import TrainConfig, TrainConfigError, TrainError, train as run_train
        except ImportError as e:
            fail(f"training needs PyTorch ({e.name} is not installed): pip install -e '.[torch]'")

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
                raise typer.BadParameter(f"not valid JSON ({e})", param_hint="'--model'") from None
        if attn_type:
            model["attn_type"] = attn_type.value
        if softmax_layers is not None:
            try:
                model["softmax_layers"] = [int(i) for i in softmax_layers.split(",") if i.strip()]
            except ValueError:
                raise typer.BadParameter(f"takes comma-separated integers, not {softmax_layers!r}",
                                         param_hint="'--softmax-layers'") from None
        cfg.model = model
        cfg.fsdp = cfg.fsdp or fsdp
        cfg.resume = cfg.resume or resume
        cfg.progress = cfg.progress and not no_progress
        run_train(cfg)
    except TrainConfigError as e:
        fail(str(e), code=2)
    except TrainError as e:
        fail(str(e))
    except KeyboardInterrupt:
        _train_interrupted(Path(cfg.out) if cfg is not None else out)


def _train_interrupted(out: Optional[Path]):
    """Ctrl-C: say what is kept and how to go on (every process of a torchrun gets the signal;
    the first one speaks)."""
    import os

    from regla_torch.train import checkpoints

    if os.environ.get("RANK", "0") == "0":
        found = checkpoints(out) if out is not None and out.is_dir() else []
        if found:
            typer.secho(f"\ninterrupted: the last checkpoint is {found[-1]} (step {found[-1].name.split('-')[-1]}); "
                        f"continue with: regla train --out {out} --resume", fg=typer.colors.YELLOW, err=True)
        else:
            typer.secho(f"\ninterrupted before the first checkpoint: nothing to resume in {out}; start again "
                        "(--save-interval sets how often checkpoints are written)", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(130)


@app.command()
def parity(
    model: str = typer.Argument(..., help="Checkpoint folder or hub repo id."),
    prompt: str = typer.Option("The quick brown fox jumps over the lazy dog.", help="Prompt to run."),
    greedy_tokens: int = typer.Option(16, min=1, help="Greedy tokens to compare."),
    spec_max_params: float = typer.Option(50e6, min=0.0, help="Run the float64 spec only below this many "
                                          "parameters."),
):
    """Run one prompt through both backends (and the spec) and report the gap."""
    import numpy as np

    try:
        import mlx.core as mx
        import torch

        import regla_mlx
        import regla_torch
    except ImportError as e:
        fail(f"parity needs both backends; {e.name} is missing: pip install -e '.[mlx,torch]'")
    from regla import checkpoint, spec

    try:
        with busy("loading the model on both backends"):
            folder = checkpoint.resolve(model)
            checkpoint.check_not_quantized(folder, "parity compares full-precision weights; run it on the "
                                           "checkpoint the quantized folder was converted from")
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

    try:
        with busy(f"loading {Path(path).name if Path(path).is_dir() else path} ({backend})"):
            if backend == "mlx":
                import mlx.core as mx

                import regla_mlx

                if seed is not None:
                    mx.random.seed(seed)
                from regla.checkpoint import resolve

                model, tokenizer = regla_mlx.load(path)
                return regla_mlx.ChatSession(model, tokenizer, max_tokens, sampling, model_path=str(resolve(path)))
            import torch

            import regla_torch
            from regla_torch.generate import ChatSession, load_tokenizer

            if seed is not None:
                torch.manual_seed(seed)
            # on an NVIDIA GPU when there is one: Triton kernels and the CUDA-graph decode step
            device = "cuda" if torch.cuda.is_available() else None
            return ChatSession(regla_torch.load(path, device=device), load_tokenizer(path), max_tokens, sampling,
                               model_path=path)
    except ImportError as e:
        other = "torch" if backend == "mlx" else "mlx"
        fail(f"the {backend} backend is not installed ({e.name} missing): pip install -e '.[{backend}]', "
             f"or use --backend {other}")
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
    attn_type: AttnType = typer.Option(AttnType.regla, case_sensitive=False,
                                       help="The type of every layer not kept softmax."),
    softmax_layers: str = typer.Option("none", help="Layers kept as softmax attention: comma-separated "
                                       "indices, 'all' (reproduces the teacher) or 'none'."),
    model_json: Optional[str] = typer.Option(None, "--model", help="Model fields over the derived ones, as "
                                             "JSON, e.g. '{\"use_output_gate\": true}'."),
    dtype: str = typer.Option("f32", callback=_dtype, metavar="[f32|bf16|f16]", help="Weights' dtype."),
    seed: int = typer.Option(0, min=0, help="Seed of the new (gate) weights."),
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
            run(src, dst, attn_type=attn_type.value, softmax_layers=parse_layers(softmax_layers), model=model,
                dtype=dtype, seed=seed, log=typer.echo)
        except LinearizeError as e:
            fail(str(e))
    for w in caught:
        if "linear layers" in str(w.message):
            typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)


@app.command("spec-check")
def spec_check(
    attn_type: List[AttnType] = typer.Option(list(MODEL_TYPES), case_sensitive=False,
                                             help="Layer types to check."),
    seed: int = typer.Option(0, min=0),
):
    """Quick self-check: random tiny models through the spec and every installed backend."""
    import numpy as np

    from regla import spec

    for at in (a.value for a in attn_type):
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
