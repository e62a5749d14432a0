"""`regla train`: the training loop, read top to bottom (nanoGPT's shape).

One process:                 regla train --data corpus/ --preset 10m --out runs/x
Many GPUs (DDP, or --fsdp):  torchrun --nproc_per_node 8 -m regla.cli train ...

Every process reads the same memory-mapped token stream; the data order is a function of
(seed, sample index) alone (``regla_torch.data.Windows``), so a resumed run and a run on
another number of processes with the same global batch see the same samples per step.
Each micro-batch is one packed row with ``cu_seqlens``: documents (ended by EOS) and
windows never attend across each other.

Checkpoints are Hugging Face folders (``save_pretrained`` + tokenizer) with a
``trainer_state.pt`` beside (optimizer, scheduler, step, data position, RNG states),
written to a temporary folder and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from regla import checkpoint as ckpt
from regla.spec import ConfigError, ModelArgs, check_weights

from .data import DataError, Windows, load_corpus, open_tokens, pack, expand, read_documents, tokenize_documents

# Model presets. Parameter counts are with tied embeddings at an 8192-token vocabulary for
# the small ones and untied at 32000 for the large ones (the vocabulary comes from the
# tokenizer; the embeddings are the rest of the difference).
PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, tie_word_embeddings=True),  # tests
    "10m": dict(hidden_size=256, num_hidden_layers=6, num_heads=4, tie_word_embeddings=True),   # 7M
    "15m": dict(hidden_size=384, num_hidden_layers=6, num_heads=4, tie_word_embeddings=True),   # 14M
    "40m": dict(hidden_size=512, num_hidden_layers=8, num_heads=4, tie_word_embeddings=True),   # 30M
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_heads=4),                            # 135M
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=4),                           # 375M (fla gla-340M)
    "760m": dict(hidden_size=1536, num_hidden_layers=24, num_heads=4),                           # 780M
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_heads=4),                           # 1.37B (fla gla-1.3B)
}


class TrainError(RuntimeError):
    """A run that cannot start or resume; raised before anything is written."""


class TrainConfigError(TrainError):
    """A setting out of range or unknown (the CLI exits with status 2 for it, as for a bad flag)."""


# One spelling of the dtypes (bf16 | f16 | f32), as `regla convert`; the others are read as them.
DTYPE_NAMES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}


@dataclass
class TrainConfig:
    data: list = field(default_factory=list)       # text/JSONL files or folders, or .bin/.npy token files
    val_data: list = field(default_factory=list)   # held-out files; empty: the corpus' last val_fraction
    val_fraction: float = 0.01
    tokenizer: str = "auto"                        # auto (init_from's, else bytes) | bytes | bpe:N | a folder or hub id
    out: str = "runs/regla"
    preset: str = "10m"
    model: dict = field(default_factory=dict)      # ModelArgs fields over the preset (attn_type, softmax_layers, ...)
    init_from: str = ""                            # start from this regla checkpoint (config and weights), e.g. linearized
    stage: str = "lm"                              # lm (next-token loss) | kl (teacher's logits) | transfer (attention outputs)
    teacher: str = ""                              # regla checkpoint giving the kl/transfer targets
    seq_len: int = 512
    batch_size: int = 8                            # sequences per micro-step and process
    grad_accum: int = 1                            # micro-steps per optimizer step
    max_steps: int = 1000
    time_limit: float = 0.0                        # seconds; >0 fits max_steps to it after 20 timed steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_batches: int = 20
    save_interval: int = 500
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"                           # auto | cpu | cuda
    dtype: str = "auto"                            # autocast: auto (bf16 on CUDA, none on CPU) | bf16 | f32
    fsdp: bool = False
    resume: bool = False
    export_dtype: str = "f32"                      # dtype of the final model written to OUT/final
    max_shard_size: str = "2GB"
    progress: bool = True

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        """Training fields at the top level; model fields either under "model" or top level too."""
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise TrainError(f"--config {path}: no such file") from None
        except json.JSONDecodeError as e:
            raise TrainError(f"--config {path}: not valid JSON ({e})") from None
        own = {f.name for f in dataclasses.fields(cls)}
        model = dict(d.pop("model", {}))
        for k in list(d):
            if k not in own:
                if k in ModelArgs.__dataclass_fields__:
                    model[k] = d.pop(k)
                else:
                    raise TrainError(f"--config {path}: unknown field {k!r} (neither a training nor a model field)")
        return cls(**d, model=model)


# --------------------------------------------------------------------- helpers
def check_config(cfg: TrainConfig):
    """Every setting in range, before anything is read or written: the CLI checks its flags
    itself; this covers --config files, a run's train_config.json and library calls."""
    cfg.dtype = DTYPE_NAMES.get(cfg.dtype, cfg.dtype)
    cfg.export_dtype = DTYPE_NAMES.get(cfg.export_dtype, cfg.export_dtype)
    def at_least(names, low, integer=True):
        kinds = (int,) if integer else (int, float)
        return [f"{k} must be {'an integer' if integer else 'a number'} >= {low}, not {getattr(cfg, k)!r}"
                for k in names if isinstance(getattr(cfg, k), bool) or not isinstance(getattr(cfg, k), kinds)
                or not getattr(cfg, k) >= low]

    bad = at_least(("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "save_interval",
                    "log_interval", "keep_checkpoints"), 1)
    bad += at_least(("seq_len",), 2) + at_least(("warmup_steps", "seed"), 0)
    bad += at_least(("weight_decay", "grad_clip", "time_limit", "val_fraction", "min_lr_ratio"), 0, integer=False)
    if not bad and (cfg.val_fraction >= 1 or cfg.min_lr_ratio > 1):
        bad.append("val_fraction must be below 1 and min_lr_ratio at most 1")
    if isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not cfg.lr > 0:
        bad.append(f"lr must be a number > 0, not {cfg.lr!r}")
    if cfg.preset not in PRESETS:
        bad.append(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if cfg.dtype not in ("auto", "bf16", "f32"):
        bad.append(f"dtype must be auto, bf16 or f32, not {cfg.dtype!r}")
    if cfg.export_dtype not in ("f32", "bf16", "f16"):
        bad.append(f"export_dtype must be f32, bf16 or f16, not {cfg.export_dtype!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad.append(f"device must be auto, cpu or cuda, not {cfg.device!r}")
    elif cfg.device == "cuda" and not torch.cuda.is_available():
        bad.append("device cuda: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False; a CPU "
                   "build of torch or no driver); use --device cpu, or auto")
    if bad:
        raise TrainConfigError("; ".join(bad))


def model_args(cfg: TrainConfig, tokenizer) -> ModelArgs:
    if cfg.init_from:
        if cfg.model:
            raise TrainError(f"--init-from takes the model from {cfg.init_from}'s config: drop the model fields "
                             f"({', '.join(sorted(cfg.model))})")
        try:
            args = ckpt.read_args(ckpt.resolve(cfg.init_from))
        except ckpt.CheckpointError as e:
            raise TrainError(f"--init-from: {e}") from None
        if len(tokenizer) > args.vocab_size:
            raise TrainError(f"the tokenizer has {len(tokenizer)} tokens, more than the vocabulary of "
                             f"{cfg.init_from} ({args.vocab_size}): train with that checkpoint's tokenizer")
        return args
    if cfg.preset not in PRESETS:
        raise TrainError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    d = {**PRESETS[cfg.preset], **cfg.model}
    d.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
             pad_token_id=tokenizer.pad_token_id)
    d.setdefault("max_position_embeddings", max(2048, cfg.seq_len))
    try:
        return ModelArgs.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise TrainError(f"model config: {e}") from None


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup, then cosine from lr down to lr*min_lr_ratio at ``total``; a factor of lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first (unfinished ones are still ``.tmp-*`` folders)."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def rng_state() -> dict:
    s = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def read_resume_state(folder: Path, args: ModelArgs):
    """Everything needed to resume from ``folder``, checked, or a TrainError; nothing is changed."""
    state_file = folder / "trainer_state.pt"
    if not state_file.exists():
        raise TrainError(f"{folder} has no trainer_state.pt: it is an exported model, not a checkpoint "
                         "to resume from")
    try:
        saved_args = ckpt.read_args(folder)
        weights = ckpt.read_weights(folder, "pt")
    except ckpt.CheckpointError as e:
        raise TrainError(f"cannot resume: {e}") from None
    mine, theirs = args.to_dict(), saved_args.to_dict()
    diff = {k: (theirs[k], mine[k]) for k in mine if theirs.get(k) != mine[k]}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise TrainError(f"cannot resume from {folder}: the model config differs ({what}). "
                         "Resume with the same preset/model/tokenizer, or start a new --out.")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged pickle/zip
        raise TrainError(f"cannot resume: {state_file} is damaged ({type(e).__name__}: {e})") from None
    missing = {"step", "samples", "optimizer", "scheduler", "rng", "max_steps", "config", "world_size"} - set(state)
    if missing:
        raise TrainError(f"cannot resume: {state_file} lacks {', '.join(sorted(missing))}; "
                         "it was not written by this version of regla train")
    return weights, state


# Fields that fix the data order and the optimization: a resumed run must keep them, or it
# would not continue the same run. (The split of the global batch into processes, micro-batches
# and accumulation may change.)
RESUME_FIXED = ("data", "val_data", "val_fraction", "tokenizer", "seq_len", "max_steps", "lr", "min_lr_ratio",
                "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seed", "dtype", "time_limit",
                "init_from", "stage", "teacher")


# What a checkpoint written before a field existed meant by its absence.
LEGACY_DEFAULTS = {"init_from": "", "stage": "lm", "teacher": ""}


def check_resume_config(cfg: TrainConfig, state: dict, world: int, folder: Path):
    saved = {**LEGACY_DEFAULTS, **state["config"]}
    for k in ("dtype", "export_dtype"):  # runs saved before the dtypes had one spelling
        saved[k] = DTYPE_NAMES.get(saved.get(k), saved.get(k))
    mine = dataclasses.asdict(cfg)
    for d in (saved, mine):  # "auto" and what it stands for are the same tokenizer
        d["tokenizer"] = tokenizer_spec(d["tokenizer"], d["init_from"])
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in RESUME_FIXED if saved.get(k) != mine[k]]
    was = saved["batch_size"] * saved["grad_accum"] * state["world_size"]
    now = cfg.batch_size * cfg.grad_accum * world
    if was != now:
        diff.append(f"global batch (batch_size x grad_accum x processes): checkpoint {was} vs now {now}")
    if diff:
        raise TrainError(f"cannot resume from {folder}: the run's settings differ ({'; '.join(diff)}). "
                         "Resume with the run's own settings (`regla train --out RUN --resume` reads them "
                         "from RUN/train_config.json), or start a new --out.")


def log(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


# ------------------------------------------------------------------------ stages
STAGES = ("lm", "kl", "transfer")


def tokenizer_spec(tokenizer: str, init_from: str) -> str:
    """``auto``: the checkpoint's own tokenizer when starting from one, else bytes."""
    if tokenizer == "auto":
        return init_from or "bytes"
    return tokenizer


class Distill(torch.nn.Module):
    """The student with a teacher's targets: ``forward(input_ids, labels, cu_seqlens) -> loss``.

    ``kl``: the mean over predicted tokens of KL(teacher || student) of the next-token
    distributions (the student learns the teacher's whole distribution, not one token).
    ``transfer`` (LoLCATs' attention transfer): every linear layer of the student gets the
    teacher's residual stream at that layer and must reproduce the teacher's softmax-attention
    output there; the loss is the mean over those layers of their MSE divided by the mean square
    of the teacher's attention update (1.0 = as far off as no attention at all). Only the linear
    layers' attention weights train in that stage.

    The teacher is kept out of the module tree (a list), so DDP/FSDP and checkpoints see only the
    student.
    """

    def __init__(self, student, teacher, stage: str):
        super().__init__()
        self.student, self._teacher, self.stage = student, [teacher], stage
        args = student.args
        self.linear = [i for i in range(args.num_hidden_layers) if args.layer_type(i) != "softmax"]

    def forward(self, input_ids, labels, cu_seqlens):
        if self.stage == "kl":
            return self.kl(input_ids, labels, cu_seqlens)
        return self.transfer(input_ids, cu_seqlens)

    def kl(self, input_ids, labels, cu_seqlens):
        import torch.nn.functional as F

        with torch.no_grad():
            target = self._teacher[0](input_ids=input_ids, cu_seqlens=cu_seqlens, use_cache=False).logits
        logits = self.student(input_ids=input_ids, cu_seqlens=cu_seqlens, use_cache=False).logits
        keep = (labels[:, 1:] != -100).flatten()  # the positions the LM loss counts
        s = F.log_softmax(logits[:, :-1].flatten(0, 1)[keep].float(), -1)
        t = F.log_softmax(target[:, :-1].flatten(0, 1)[keep].float(), -1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean")

    @torch.no_grad()
    def teacher_attention(self, input_ids, cu_seqlens):
        """The teacher's residual stream entering each layer and that stream after its attention."""
        t = self._teacher[0]
        h = t.model.embeddings(input_ids)
        inputs, outputs = [], []
        for block in t.model.layers:
            inputs.append(h)
            h, _ = block.attn(h, block.attn_norm, None, cu_seqlens, False)
            outputs.append(h)
            h = block.mlp(h, block.mlp_norm)
        return inputs, outputs

    def transfer(self, input_ids, cu_seqlens):
        inputs, outputs = self.teacher_attention(input_ids, cu_seqlens)
        loss = 0.0
        for i in self.linear:
            block = self.student.model.layers[i]
            got, _ = block.attn(inputs[i], block.attn_norm, None, cu_seqlens, False)
            # both outputs include the residual input, which cancels in the difference
            err = (got.float() - outputs[i].float()).pow(2).mean()
            loss = loss + err / (outputs[i].float() - inputs[i].float()).pow(2).mean().clamp(min=1e-12)
        return loss / len(self.linear)


def load_teacher(cfg: TrainConfig, args: ModelArgs, device):
    """The frozen teacher of a kl/transfer stage, checked against the student's config."""
    from .loading import load_checkpoint

    try:
        teacher = load_checkpoint(cfg.teacher, device=device)
    except (ckpt.CheckpointError, ConfigError) as e:
        raise TrainError(f"--teacher: {e}") from None
    t = teacher.args
    for k in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(t, k) != getattr(args, k):
            raise TrainError(f"--teacher {cfg.teacher} has {k} {getattr(t, k)}, the student {getattr(args, k)}")
    if cfg.stage == "transfer":
        linear = [i for i in range(args.num_hidden_layers) if args.layer_type(i) != "softmax"]
        if not linear:
            raise TrainError("--stage transfer trains the linear layers, and this model has none")
        odd = [i for i in linear if t.layer_type(i) != "softmax"]
        if odd:
            raise TrainError(f"--stage transfer needs softmax attention in the teacher where the student is linear; "
                             f"the teacher's layers {odd} are not (use `regla linearize SRC T --softmax-layers all`)")
    teacher.requires_grad_(False)
    return teacher


# ------------------------------------------------------------------------ the run
@dataclass
class Run:
    """What ``setup`` builds and the loop, ``train_step``, ``evaluate`` and ``save`` use."""

    cfg: TrainConfig
    world: int
    rank: int
    device: torch.device
    amp: Optional[torch.dtype]
    out: Path
    tokenizer: object
    args: ModelArgs
    tokens: object                 # the training token stream
    train_windows: Windows
    val_windows: Optional[Windows]
    student: torch.nn.Module       # the model trained and saved (unwrapped by DDP; the FSDP root)
    model: torch.nn.Module         # what a step calls: student or Distill, wrapped by DDP
    objective: Optional[Distill]   # kl/transfer stages
    opt: torch.optim.Optimizer
    sched: object
    total: int                     # max_steps (shortened once by --time-limit)
    step: int = 0
    samples: int = 0
    resumed_from: Optional[Path] = None
    n_params: int = 0

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()

    def to_device(self, ids, labels, cu):
        return (torch.from_numpy(ids).to(self.device), torch.from_numpy(labels).to(self.device),
                torch.from_numpy(cu).to(device=self.device, dtype=torch.int32))


def setup(cfg: TrainConfig, world: int, rank: int, device) -> Run:
    """Check the settings, read the data, build (or resume) model, optimizer and schedule.
    Everything is checked before anything is written."""
    from .model import ReGLAConfig, ReGLAForCausalLM

    out = Path(cfg.out)
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.seq_len < 2 or cfg.max_steps < 1:
        raise TrainError("batch_size, grad_accum and max_steps must be >= 1 and seq_len >= 2")
    # dtype, export_dtype: spelled and checked by check_config
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16, "f32": None}[cfg.dtype]
    if cfg.stage not in STAGES:
        raise TrainError(f"--stage {cfg.stage!r}: choose {', '.join(STAGES)}")
    if (cfg.stage != "lm") != bool(cfg.teacher):
        raise TrainError(f"--stage {cfg.stage} " + ("needs a --teacher checkpoint" if cfg.stage != "lm" else
                         "learns from the data alone: drop --teacher, or pick --stage kl or transfer"))
    if cfg.stage == "transfer" and cfg.fsdp and world > 1:
        raise TrainError("--stage transfer runs single layers of the student, which FSDP shards by block: "
                         "use DDP (drop --fsdp)")

    for flag, path in (("--init-from", cfg.init_from), ("--teacher", cfg.teacher)):
        try:
            if path:
                ckpt.read_args(ckpt.resolve(path))
        except ckpt.CheckpointError as e:
            raise TrainError(f"{flag}: {e}") from None

    # ---- data
    if not cfg.data:
        raise TrainError("no training data: pass --data FILE_OR_FOLDER (text, JSONL, .bin or .npy)")
    try:
        tokenizer, tokens = load_corpus(cfg.data, tokenizer_spec(cfg.tokenizer, cfg.init_from))
        if cfg.val_data:
            vfiles = expand(cfg.val_data)
            if vfiles[0].suffix in (".bin", ".npy"):
                val_tokens = open_tokens(vfiles, len(tokenizer))
            else:
                val_tokens = tokenize_documents(read_documents(vfiles), tokenizer)
        else:
            n_val = max(cfg.seq_len, int(len(tokens) * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
            if n_val and len(tokens) - n_val < cfg.seq_len:
                raise DataError(f"the corpus ({len(tokens)} tokens) is too small to hold out "
                                f"{n_val} validation tokens and still train on windows of {cfg.seq_len}")
            tokens, val_tokens = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
        train_windows = Windows(tokens, cfg.seq_len, cfg.seed)
        val_windows = Windows(val_tokens, cfg.seq_len, cfg.seed) if len(val_tokens) >= cfg.seq_len else None
    except DataError as e:
        raise TrainError(str(e)) from None
    args = model_args(cfg, tokenizer)

    # ---- resume, or start fresh (from random weights or --init-from's)
    existing = checkpoints(out) if out.exists() else []
    weights, state, resumed_from = None, None, None
    if cfg.resume:
        if not existing:
            raise TrainError(f"--resume: {out} holds no checkpoint-* folder to resume from")
        resumed_from = existing[-1]
        weights, state = read_resume_state(resumed_from, args)
        check_resume_config(cfg, state, world, resumed_from)
    elif existing:
        raise TrainError(f"{out} already holds checkpoints ({existing[-1].name}); pass --resume to "
                         "continue that run or choose another --out")
    elif cfg.init_from:
        try:
            weights = ckpt.sanitize(ckpt.read_weights(ckpt.resolve(cfg.init_from), "pt"), args)
            check_weights(weights, args)
        except (ckpt.CheckpointError, ConfigError) as e:
            raise TrainError(f"--init-from: {e}") from None
    teacher = load_teacher(cfg, args, device) if cfg.teacher else None

    # ---- model, objective, optimizer, schedule
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    student = ReGLAForCausalLM(ReGLAConfig(**args.to_dict()))
    if weights is not None:
        if args.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embeddings.weight"]
        try:
            student.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        except RuntimeError as e:
            raise TrainError(f"the checkpoint's weights do not fit the model ({e})") from None
    student.to(device)
    n_params = sum(p.numel() for p in student.parameters())
    objective = Distill(student, teacher, cfg.stage) if teacher is not None else None
    if cfg.stage == "transfer":  # only the linear layers' attention learns
        student.requires_grad_(False)
        for i in objective.linear:
            student.model.layers[i].attn.requires_grad_(True)
    model = objective if objective is not None else student
    if world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in student.model.layers:
            fully_shard(block)
        fully_shard(student)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=device.type == "cuda")
    run = Run(cfg=cfg, world=world, rank=rank, device=device, amp=amp, out=out, tokenizer=tokenizer, args=args,
              tokens=tokens, train_windows=train_windows, val_windows=val_windows, student=student, model=model,
              objective=objective, opt=opt, sched=None, total=cfg.max_steps, resumed_from=resumed_from,
              n_params=n_params)
    run.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg, run.total))
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        try:
            set_optimizer_state_dict(student, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
            run.sched.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise TrainError(f"cannot resume: the optimizer state does not fit this model ({e})") from None
        run.step, run.samples, run.total = state["step"], state["samples"], state["max_steps"]
        set_rng_state(state["rng"])
    return run


def _diverged(step, loss, gnorm, detail="") -> TrainError:
    return TrainError(f"step {step}: loss {loss}, gradient norm {gnorm}: training diverged{detail}. "
                      "Lower --lr, raise --warmup-steps or try --dtype f32, then --resume.")


def _nonfinite_grads(model, show=4) -> str:
    """The parameters whose gradient is not finite, deepest first: a NaN made in the backward
    spreads to everything before it, so the deepest one named is where it was made."""
    names = []
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and not bool(torch.isfinite(g.full_tensor() if hasattr(g, "full_tensor") else g).all()):
            names.append(name)
    more = f" and {len(names) - show} earlier" if len(names) > show else ""
    return f"{len(names)} parameters, deepest first: " + ", ".join(names[::-1][:show]) + more


def train_step(run: Run) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches: ``(mean loss, gradient norm)``."""
    cfg, model = run.cfg, run.model
    loss_acc = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum):
        first = run.samples + (micro * run.world + run.rank) * cfg.batch_size
        rows = [run.train_windows.sample(first + i) for i in range(cfg.batch_size)]
        ids, labels, cu = run.to_device(*pack(rows, run.tokenizer.eos_token_id))
        # Sync gradients only on the last micro-step (DDP); FSDP reduces every backward.
        sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
        with (nullcontext() if sync else model.no_sync()), run.autocast():
            if run.objective is None:
                loss = model(input_ids=ids, labels=labels, cu_seqlens=cu, use_cache=False).loss
            else:
                loss = model(ids, labels, cu)
        (loss / cfg.grad_accum).backward()
        loss_acc += loss.detach() / cfg.grad_accum
    # the norm first (with or without clipping), the clipping after the check: clipping by a
    # NaN norm would make every gradient NaN and hide where it started
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    gnorm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    if not math.isfinite(gnorm):
        # stop before the update: the weights and the last checkpoint stay usable, and the
        # message says where the gradient broke
        raise _diverged(run.step + 1, loss_acc.item(), gnorm,
                        f"; non-finite gradients in {_nonfinite_grads(model)}")
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg.grad_clip, total)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    run.samples += run.global_batch
    if run.world > 1:
        dist.all_reduce(loss_acc, op=dist.ReduceOp.AVG if run.device.type == "cuda" else dist.ReduceOp.SUM)
        if run.device.type != "cuda":  # gloo has no AVG
            loss_acc /= run.world
    return loss_acc.item(), gnorm


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Mean token loss over the first eval_batches*batch_size validation windows (split by rank),
    and the stage's own loss on them for kl/transfer runs: ``{"val_loss", "val_ppl"[, "val_<stage>"]}``."""
    cfg, world, rank = run.cfg, run.world, run.rank
    run.model.eval()
    n = min(run.val_windows.count, cfg.eval_batches * cfg.batch_size)
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)
    # Every rank runs the same number of forwards (FSDP's are collective); a rank past the
    # end runs window 0 and counts nothing.
    for r in range(-(-n // (world * cfg.batch_size))):
        start = (r * world + rank) * cfg.batch_size
        weight = 1.0 if start < n else 0.0
        rows = [run.val_windows.window(w) for w in range(start, min(n, start + cfg.batch_size))] \
            or [run.val_windows.window(0)]
        ids, labels, cu = run.to_device(*pack(rows, run.tokenizer.eos_token_id))
        with run.autocast():
            loss = run.student(input_ids=ids, labels=labels, use_cache=False, cu_seqlens=cu).loss
            stage = run.objective(ids, labels, cu) if run.objective is not None else loss
        count = int((labels[:, 1:] != -100).sum()) * weight
        sums += torch.tensor([loss.double().item() * count, count, stage.double().item() * weight],
                             device=run.device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    run.model.train()
    vl = (sums[0] / sums[1].clamp(min=1)).item()
    rec = {"val_loss": vl, "val_ppl": math.exp(min(vl, 50))}
    if run.objective is not None:
        rec[f"val_{cfg.stage}"] = (sums[2] / max(1, -(-n // cfg.batch_size))).item()
    return rec


def save(run: Run, folder_name: str, with_state: bool, dtype=None):
    """Write a checkpoint (or the exported model) to a temp folder, then rename it into place.
    Under FSDP every rank takes part in gathering the full state; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    cfg, out = run.cfg, run.out
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(run.student, options=opts)
    osd = get_optimizer_state_dict(run.student, run.opt, options=opts) if with_state else None
    if run.rank == 0:
        final = out / folder_name
        tmp = out / f".tmp-{folder_name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        msd = {k: v.detach().cpu() for k, v in msd.items()}
        if dtype is not None:
            msd = {k: v.to(dtype) for k, v in msd.items()}
        if run.args.tie_word_embeddings:
            msd.pop("lm_head.weight", None)
        run.student.save_pretrained(tmp, state_dict=msd, safe_serialization=True, max_shard_size=cfg.max_shard_size)
        if dtype is not None:  # save_pretrained records the live model's dtype, not the file's
            conf = json.loads((tmp / "config.json").read_text())
            conf["dtype"] = str(dtype).replace("torch.", "")
            (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        run.tokenizer.save_pretrained(tmp)
        if with_state:
            torch.save({"step": run.step, "samples": run.samples, "max_steps": run.total, "optimizer": osd,
                        "scheduler": run.sched.state_dict(), "rng": rng_state(), "world_size": run.world,
                        "config": dataclasses.asdict(cfg)}, tmp / "trainer_state.pt")
        if final.exists():  # an export of the same name from an earlier run: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        if with_state:
            for old in checkpoints(out)[: -cfg.keep_checkpoints]:
                shutil.rmtree(old)
    if run.world > 1:
        dist.barrier()


# ------------------------------------------------------------------------ train
def train(cfg: TrainConfig, on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """Run (or resume) a training run; returns the last metrics. ``on_step(step, loss)`` is
    called after every optimizer step (tests use it to simulate a crash)."""
    check_config(cfg)
    # ---- processes and devices (torchrun sets these; one process otherwise)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        metrics = _train(cfg, on_step, world, rank, device)
        if world > 1:
            # Free the sharded model (its DTensors and device mesh) while the group still exists,
            # and let every rank finish its last collectives before any tears the group down:
            # freed later, at interpreter exit, gloo aborted a rank in CI (SIGABRT after "done").
            gc.collect()
            dist.barrier()
        return metrics
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, on_step, world, rank, device):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar (ours); not one per saved shard

    run_start = time.perf_counter()
    run = setup(cfg, world, rank, device)
    out = run.out
    tokens_per_step = run.global_batch * cfg.seq_len
    args = run.args
    log(rank, f"model {args.attn_type} (softmax layers {args.softmax_layers or 'none'}): {run.n_params / 1e6:.2f}M "
              f"parameters{f' from {cfg.init_from}' if cfg.init_from else ''} | stage {cfg.stage} | "
              f"{len(run.tokens):,} training tokens ({run.train_windows.count:,} windows of {cfg.seq_len}) | "
              f"{world} process(es) on {device.type}{' FSDP' if cfg.fsdp and world > 1 else ''} | "
              f"global batch {run.global_batch} x {cfg.seq_len} = {tokens_per_step:,} tokens/step")
    if run.resumed_from is not None:
        log(rank, f"resumed from {run.resumed_from} at step {run.step}")

    # ---- the log: one JSON line per step; on resume, lines past the checkpoint are dropped
    # (they belong to the steps the crash lost and will be trained again)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log_file = out / "log.jsonl"
        if run.resumed_from is not None and log_file.exists():
            kept = [l for l in log_file.read_text().splitlines() if l and json.loads(l)["step"] <= run.step]
            log_file.write_text("".join(l + "\n" for l in kept))
        elif run.resumed_from is None:
            log_file.write_text("")
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    def write_log(rec):
        if rank == 0:
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    # ---- where a started-from checkpoint stands before any step (the "before" of a recovery)
    if cfg.init_from and run.resumed_from is None and run.val_windows is not None:
        rec = {"step": 0, **evaluate(run)}
        log(rank, f"step 0: val loss {rec['val_loss']:.4f}, perplexity {rec['val_ppl']:.2f}"
                  + (f", val {cfg.stage} {rec[f'val_{cfg.stage}']:.4f}" if run.objective is not None else ""))
        write_log(rec)

    # ---- the loop
    run.model.train()
    metrics = {}
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                        TextColumn("ETA"), TimeRemainingColumn(), disable=rank != 0 or not cfg.progress)
    timing = {"t0": None, "s0": None}
    fresh = run.resumed_from is None
    with progress:
        task = progress.add_task("train", total=run.total, completed=run.step, loss=float("nan"), tps=0.0)
        t_last = time.perf_counter()
        while run.step < run.total:
            lr_now = run.opt.param_groups[0]["lr"]
            loss_val, gnorm = train_step(run)
            step = run.step
            if not math.isfinite(loss_val):  # (a non-finite gradient stops train_step itself)
                # Stop before a non-finite update reaches a checkpoint; the last one stays usable.
                raise _diverged(step, loss_val, gnorm)
            now = time.perf_counter()
            tps = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            rec = {"step": step, "loss": loss_val, "lr": lr_now, "grad_norm": gnorm, "tokens_per_s": tps}
            progress.update(task, completed=step, loss=loss_val, tps=tps)

            # --time-limit: after 20 timed steps (past compilation/autotuning) fit max_steps
            # to the time left; the warmup is not over yet, so only the cosine is stretched.
            if cfg.time_limit > 0 and fresh:
                if step == 5:
                    timing["t0"], timing["s0"] = now, step
                elif step == 25:
                    per_step = (now - timing["t0"]) / (step - timing["s0"])
                    evals = max(1, run.total // max(1, cfg.eval_interval))
                    budget = cfg.time_limit - (now - run_start) - 30.0 - evals * 2.0
                    new_total = max(step + 1, min(run.total, step + int(budget / per_step)))
                    if new_total != run.total:
                        log(rank, f"--time-limit: {per_step * 1e3:.0f} ms/step, max_steps {run.total} -> {new_total}")
                        run.total = new_total
                        progress.update(task, total=new_total)
            if step % cfg.eval_interval == 0 or step == run.total:
                if run.val_windows is not None:
                    rec.update(evaluate(run))
                    progress.console.print(f"step {step}: val loss {rec['val_loss']:.4f}, perplexity "
                                           f"{rec['val_ppl']:.2f}" + (f", val {cfg.stage} {rec[f'val_{cfg.stage}']:.4f}"
                                                                     if run.objective is not None else ""))
            if rank == 0 and (step % cfg.log_interval == 0 or step == run.total) and not cfg.progress:
                print(f"step {step}/{run.total} loss {loss_val:.4f} lr {lr_now:.2e} {tps:,.0f} tok/s", flush=True)
            write_log(rec)
            metrics = rec
            if step % cfg.save_interval == 0 or step == run.total:
                save(run, f"checkpoint-{step}", with_state=True)
            if on_step is not None:
                on_step(step, loss_val)
            t_last = time.perf_counter()  # tokens/s counts training, not evaluation or saving
    if not metrics:
        log(rank, f"the run in {out} had already reached its last step ({run.step}); writing {out / 'final'} again")
    dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[cfg.export_dtype]
    save(run, "final", with_state=False, dtype=dt)
    if metrics:
        log(rank, f"done: step {run.step}, loss {metrics['loss']:.4f}"
                  + (f", val perplexity {metrics['val_ppl']:.2f}" if "val_ppl" in metrics else "")
                  + f"; model in {out / 'final'}")
    return metrics
