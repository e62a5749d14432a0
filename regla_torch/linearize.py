"""`regla linearize`: a pretrained Llama-family Transformer -> a regla checkpoint.

The teacher is a Hugging Face folder (Llama, Mistral, Qwen2, SmolLM: ``LlamaForCausalLM``-style
weights) or a GGUF file of one. Every weight is kept: embeddings, norms, MLPs, and q/k/v/o of
every layer (grouped kv heads keep their grouping: the linear layers get ``num_kv_heads`` of the
teacher). Layers listed in ``softmax_layers`` stay softmax attention and compute exactly what the
teacher computes; the others become ``regla``/``gla``/``gsa`` layers whose new parameters start
where they disturb least:

- the low-rank forget-gate projection's second factor is zero and its bias sets per-channel decay
  rates log-spaced from 1 - 2^-5 to 1 - 2^-12 (memories of ~32 to ~4096 tokens, RetNet's range),
  so every head starts with short and long memory; the first factor is random so gradients flow;
- ReGLA's refining gate starts at r = 1/2 (zero weights, zero bias), where the refined gate equals
  the forget gate;
- no output gate (``use_output_gate`` false): a swish gate cannot start as the identity; pass
  ``{"use_output_gate": true}`` in ``model`` to have one (it then starts random);
- the per-head output norm's weights are calibrated: channel c gets the RMS of channel c of the
  teacher's attention output (before ``o_proj``) in that layer, measured on a short built-in
  English text, so the linear layer's output starts at the teacher's scale (with weight one it is
  several times larger, and Adam would need hundreds of steps at 1e-3 to shrink it); without a
  tokenizer the weights stay one;
- GSA's slot gates keep the model's random initialisation.

Recovery training (``regla train --init-from DST --stage transfer|kl|lm``) does the rest.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from regla.layer_math import rope_inv_freq
from regla.spec import ConfigError, ModelArgs

# HF model types whose checkpoints are Llama's layout (plus Qwen2's q/k/v biases).
TEACHER_TYPES = ("llama", "mistral", "qwen2")
DECAY_RANGE = (5.0, 12.0)  # forget gates start at 1 - 2^-a for a log-spaced over this range


# The calibration text of the output norms (see the module docstring): plain, varied English.
CALIBRATION_TEXT = (
    "The river runs past the old mill and into the valley, where farmers bring their grain to market "
    "every autumn. In 1887 a bridge of iron replaced the wooden one; it still stands. Children learn to "
    "count, to read and to ask why the sky is blue. A recipe: mix two cups of flour with one cup of water, "
    "knead for ten minutes, then let the dough rest. def add(a, b):\n    return a + b\n"
    "Questions about science, history, music and law fill the library, and its readers answer each other.")


class LinearizeError(ValueError):
    """A teacher that cannot be linearized, or bad options; the message names the fix."""


# ------------------------------------------------------------------------ the teacher
def read_teacher(src) -> tuple[dict, dict, callable]:
    """``(hf_config, weights, save_tokenizer)`` of a HF folder or a GGUF file.

    ``weights`` are torch tensors under transformers' Llama names; ``save_tokenizer(folder)``
    writes the teacher's tokenizer (with its chat template) there.
    """
    src = Path(src).expanduser()
    if src.is_file() and src.suffix == ".gguf":
        from .gguf import read_gguf

        return read_gguf(src)
    if src.is_file():
        raise LinearizeError(f"{src} is a file but not a .gguf: give a GGUF file or a transformers model folder")
    if not src.is_dir():
        raise LinearizeError(f"{src}: no such folder or .gguf file")
    from regla import checkpoint

    try:
        config = checkpoint.read_config(src)
        weights = checkpoint.read_weights(src, "pt")
    except checkpoint.CheckpointError as e:
        raise LinearizeError(str(e)) from None

    def save_tokenizer(dst: Path):
        from regla.convert.common import copy_tokenizer

        copy_tokenizer(src, dst)

    return config, weights, save_tokenizer


def _rope(cfg: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) from a transformers config (5.x ``rope_parameters`` or 4.x
    ``rope_theta`` + ``rope_scaling``)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    return theta, (params or None)


def student_args(cfg: dict, attn_type: str, softmax_layers: Sequence[int], overrides: Optional[dict] = None,
                 dropped_bias: Optional[list] = None) -> ModelArgs:
    """The regla config of the linearized model of a transformers Llama-family config."""
    kind = cfg.get("model_type")
    if kind not in TEACHER_TYPES:
        raise LinearizeError(f"model_type {kind!r} is not a Llama-family model regla can linearize "
                             f"({', '.join(TEACHER_TYPES)})")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise LinearizeError(f"hidden_act {cfg['hidden_act']!r}: regla's MLP is SwiGLU (silu); this teacher's is not")
    if cfg.get("mlp_bias"):
        raise LinearizeError("mlp_bias is true: regla's MLP has no biases")
    if cfg.get("sliding_window") and (kind == "mistral" or cfg.get("use_sliding_window")) \
            and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
        raise LinearizeError(f"this teacher's softmax attention is windowed (sliding_window "
                             f"{cfg['sliding_window']}), which regla's softmax layers are not")
    d, H = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    Hkv = int(cfg.get("num_key_value_heads") or H)
    D = int(cfg.get("head_dim") or d // H)
    L = int(cfg["num_hidden_layers"])
    bad = [i for i in softmax_layers if not 0 <= i < L]
    if bad:
        raise LinearizeError(f"--softmax-layers {bad}: the teacher has layers 0..{L - 1}")
    theta, scaling = _rope(cfg)
    qkv_bias = kind == "qwen2" or bool(cfg.get("attention_bias"))
    # expand_k/v are fractions of hidden_size: exact only when H*D/d survives float rounding
    expand = H * D / d
    if int(d * expand) != H * D:
        raise LinearizeError(f"heads x head_dim = {H * D} is not a fraction of hidden_size {d} that a "
                             "float can hold exactly")
    fields = dict(attn_type=attn_type, vocab_size=int(cfg["vocab_size"]), hidden_size=d, num_hidden_layers=L,
                  num_heads=H, num_kv_heads=Hkv, expand_k=expand, expand_v=expand,
                  intermediate_size=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                  tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                  softmax_layers=list(softmax_layers), softmax_num_heads=H, softmax_num_kv_heads=Hkv,
                  softmax_head_dim=D, softmax_qkv_bias=qkv_bias,
                  softmax_o_bias=bool(cfg.get("attention_bias")) and kind != "qwen2",
                  rope_theta=theta, softmax_rope_scaling=scaling,
                  max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                  use_output_gate=False, bos_token_id=cfg.get("bos_token_id"),
                  eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"))
    fields.update(overrides or {})
    try:
        args = ModelArgs(**fields)
    except ConfigError as e:
        raise LinearizeError(f"the linearized config is invalid: {e}") from None
    except TypeError as e:
        raise LinearizeError(f"--model: {e}") from None
    linear = [i for i in range(L) if args.layer_type(i) != "softmax"]
    if linear and (args.head_k_dim != D or args.head_v_dim != D or args.num_kv_heads != Hkv):
        raise LinearizeError("--model changed the linear layers' heads (num_heads/num_kv_heads/expand_k/"
                             "expand_v): the teacher's q/k/v/o would not fit them")
    if qkv_bias and linear and dropped_bias is not None:
        dropped_bias.extend(linear)
    return args


def _decay_bias(args: ModelArgs, width: int) -> torch.Tensor:
    """Gate-projection biases giving forget gates 1 - 2^-a, a log-spaced over DECAY_RANGE across
    each head's key channels (same spread in every head)."""
    Kd = args.head_k_dim
    a = torch.linspace(*DECAY_RANGE, Kd, dtype=torch.float64)
    log_alpha = torch.log1p(-torch.exp2(-a))  # log(1 - 2^-a)
    # log alpha = logsigmoid(z) / tau: z = logit(alpha^tau); refining gate at r = 1/2 leaves it as is
    p = torch.exp(args.gate_logit_normalizer * log_alpha)
    z = torch.log(p) - torch.log1p(-p)
    return z.repeat(width // Kd).float()


def map_weights(args: ModelArgs, teacher: dict, fresh: dict) -> dict:
    """The student's state dict: teacher tensors renamed, new parameters from ``fresh`` (a random
    initialisation of the student) with the gates set as the module docstring says."""
    out = dict(fresh)
    used = set()

    def take(src, dst):
        if src not in teacher:
            raise LinearizeError(f"the teacher has no tensor {src}: is it a Llama-family checkpoint?")
        if dst not in out or tuple(out[dst].shape) != tuple(teacher[src].shape):
            want = tuple(out[dst].shape) if dst in out else "none"
            raise LinearizeError(f"{src} has shape {tuple(teacher[src].shape)}, the student's {dst} {want}")
        out[dst] = teacher[src].detach().to(out[dst].dtype)
        used.add(src)

    take("model.embed_tokens.weight", "model.embeddings.weight")
    take("model.norm.weight", "model.norm.weight")
    if not args.tie_word_embeddings:
        take("lm_head.weight", "lm_head.weight")
    for i in range(args.num_hidden_layers):
        t, s = f"model.layers.{i}.", f"model.layers.{i}."
        take(t + "input_layernorm.weight", s + "attn_norm.weight")
        take(t + "post_attention_layernorm.weight", s + "mlp_norm.weight")
        for n in ("gate_proj", "up_proj", "down_proj"):
            take(t + f"mlp.{n}.weight", s + f"mlp.{n}.weight")
        for n in "qkvo":
            take(t + f"self_attn.{n}_proj.weight", s + f"attn.{n}_proj.weight")
            if t + f"self_attn.{n}_proj.bias" in teacher:
                if args.layer_type(i) == "softmax":
                    take(t + f"self_attn.{n}_proj.bias", s + f"attn.{n}_proj.bias")
                else:
                    used.add(t + f"self_attn.{n}_proj.bias")  # dropped: the caller warns
        kind = args.layer_type(i)
        if kind in ("regla", "gla"):
            a = s + "attn."
            low = args.gate_low_rank_dim > 0
            last = "gk_proj.1" if low else "gk_proj"
            out[a + f"{last}.weight"] = torch.zeros_like(out[a + f"{last}.weight"])
            out[a + f"{last}.bias"] = _decay_bias(args, out[a + f"{last}.bias"].shape[0])
            if args.use_refining_gate:
                last = "gr_proj.1" if low else "gr_proj"
                out[a + f"{last}.weight"] = torch.zeros_like(out[a + f"{last}.weight"])
                out[a + f"{last}.bias"] = torch.zeros_like(out[a + f"{last}.bias"])
    if args.tie_word_embeddings:
        used.add("lm_head.weight")
    left = sorted(k for k in teacher if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise LinearizeError(f"{len(left)} teacher tensors have no place in a regla model "
                             f"({', '.join(left[:4])}{' ...' if len(left) > 4 else ''})")
    return out


@torch.no_grad()
def calibrate_norms(student, teacher: dict, ids: torch.Tensor) -> None:
    """Set each linear layer's output-norm weight to the per-channel RMS of the teacher's attention
    output there (module docstring). Runs the teacher layer by layer from its own weights: the
    student's modules serve its norms and MLPs (the teacher's), softmax attention is written out."""
    import torch.nn.functional as F

    from .model import rope

    args = student.args
    H, Hkv, D = args.softmax_num_heads, args.softmax_num_kv_heads, args.softmax_head_dim
    inv = torch.tensor(rope_inv_freq(D, args.rope_theta, args.softmax_rope_scaling), dtype=torch.float32)
    student = student.float()
    T = ids.shape[1]
    pos = torch.arange(T)
    h = student.model.embeddings(ids)
    for i, block in enumerate(student.model.layers):
        p = f"model.layers.{i}.self_attn."
        x = block.attn_norm(h)
        q, k, v = (F.linear(x, teacher[p + f"{n}_proj.weight"].float(),
                            None if p + f"{n}_proj.bias" not in teacher else teacher[p + f"{n}_proj.bias"].float())
                   .view(1, T, -1, D) for n in "qkv")
        q, k = rope(q, pos, inv), rope(k, pos, inv)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(H // Hkv, 1),
                                           v.transpose(1, 2).repeat_interleave(H // Hkv, 1), is_causal=True)
        o = o.transpose(1, 2)  # [1, T, H, D]: the attention output before o_proj
        ob = teacher.get(p + "o_proj.bias")
        kind = args.layer_type(i)
        if kind in ("regla", "gla") and args.attn_norm != "none" and args.elementwise_affine:
            getattr(block.attn, args.norm_name).weight.copy_(o.pow(2).mean((0, 1, 2)).sqrt())
        elif kind == "gsa" and args.elementwise_affine:
            block.attn.g_norm.weight.copy_(o.reshape(1, T, -1).pow(2).mean((0, 1)).sqrt())
        h = h + F.linear(o.reshape(1, T, -1), teacher[p + "o_proj.weight"].float(),
                         None if ob is None else ob.float())
        h = block.mlp(h, block.mlp_norm)


def parse_layers(spec: str, num_layers: Optional[int] = None) -> Union[list, str]:
    """``--softmax-layers``: comma-separated indices, ``all`` or ``none``."""
    spec = (spec or "").strip().lower()
    if spec in ("", "none"):
        return []
    if spec == "all":
        return "all" if num_layers is None else list(range(num_layers))
    try:
        return sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise LinearizeError(f"--softmax-layers takes comma-separated layer indices, 'all' or 'none', "
                             f"not {spec!r}") from None


def linearize(src, dst, attn_type: str = "regla", softmax_layers: Union[Sequence[int], str] = (),
              model: Optional[dict] = None, dtype: str = "f32", seed: int = 0, log=print) -> Path:
    """Write the linearized checkpoint of ``src`` (HF folder or .gguf) to the new folder ``dst``.

    Nothing is left at ``dst`` when it fails (written beside it, then renamed).
    """
    from regla.convert.common import ConvertError, staged_output

    from .model import ReGLAConfig, ReGLAForCausalLM

    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    if dtype not in dtypes:
        raise LinearizeError(f"--dtype {dtype!r}: choose f32, bf16 or f16")
    if attn_type not in ("regla", "gla", "gsa"):
        raise LinearizeError(f"--attn-type {attn_type!r}: choose regla, gla or gsa")
    dst = Path(dst).expanduser()
    if dst.exists():
        raise LinearizeError(f"{dst} already exists: choose a new output folder or remove it first")
    config, teacher, save_tokenizer = read_teacher(src)
    L = int(config.get("num_hidden_layers", 0))
    layers = list(range(L)) if softmax_layers == "all" else list(softmax_layers)
    dropped: list = []
    args = student_args(config, attn_type, layers, model, dropped)
    if dropped:
        warnings.warn(f"the teacher's q/k/v biases are dropped in the {len(dropped)} linear layers (regla's "
                      "linear layers have none); the recovery training makes up for them", stacklevel=2)
    torch.manual_seed(seed)
    student = ReGLAForCausalLM(ReGLAConfig(**args.to_dict()))
    fresh = {k: v for k, v in student.state_dict().items()}
    if args.tie_word_embeddings:
        fresh.pop("lm_head.weight", None)
    weights = map_weights(args, teacher, fresh)
    if args.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embeddings.weight"]
    student.load_state_dict(weights, strict=True)
    student.eval()
    n_lin = sum(args.layer_type(i) != "softmax" for i in range(L))
    log(f"{src}: {config.get('model_type')} teacher, {L} layers, d={args.hidden_size}, {args.num_heads} heads "
        f"({args.num_kv_heads} kv) of {args.softmax_head_dim}; {n_lin} layers -> {attn_type}, "
        f"{L - n_lin} kept softmax")
    try:
        with staged_output(dst) as tmp:
            save_tokenizer(tmp)
            calibrated = 0
            if n_lin:
                ids = calibration_ids(tmp, args.vocab_size)
                if ids is not None:
                    calibrate_norms(student, teacher, ids)
                    calibrated = ids.shape[1]
            student.to(dtypes[dtype])
            student.save_pretrained(tmp, safe_serialization=True)
            (tmp / "linearized_from.json").write_text(json.dumps(
                {"source": str(src), "attn_type": attn_type, "softmax_layers": args.softmax_layers,
                 "decay_range": DECAY_RANGE, "norm_calibration_tokens": calibrated, "seed": seed},
                indent=1) + "\n")
    except ConvertError as e:
        raise LinearizeError(str(e)) from None
    log(f"wrote {dst}")
    return dst


def calibration_ids(folder: Path, vocab_size: int) -> Optional[torch.Tensor]:
    """CALIBRATION_TEXT in the teacher's tokens, or None when the folder has no usable tokenizer."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        ids = AutoTokenizer.from_pretrained(str(folder))(CALIBRATION_TEXT, add_special_tokens=False)["input_ids"]
    except (OSError, ValueError):
        return None
    finally:
        hf_logging.set_verbosity(level)
    if not ids or max(ids) >= vocab_size:
        return None
    return torch.tensor([ids])


def evenly_spaced(num_layers: int, count: int) -> list:
    """``count`` layer indices spread evenly over ``num_layers`` (the hybrid's softmax layers)."""
    if count <= 0:
        return []
    return sorted({min(num_layers - 1, int(math.floor((j + 0.5) * num_layers / count))) for j in range(count)})
