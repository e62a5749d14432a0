"""MLX folder (quantized or not) -> Hugging Face folder that ``regla_torch`` / transformers load."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .common import ConvertError, copy_tokenizer, staged_output

TORCH_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def _weights_as_torch(folder: Path, quantized: bool) -> dict:
    """HF-named torch tensors. Plain MLX folders already hold the HF names, so they are read
    directly; quantized ones are dequantized by MLX first (mlx-lm's ``dequantize_model``)."""
    import torch

    from regla import checkpoint

    if not quantized:
        return checkpoint.read_weights(folder, framework="pt")
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from regla_mlx.generate import load_model

    from .quantize import dequantize

    model = dequantize(load_model(folder))
    # NumPy has no bfloat16: widen to float32 on the MLX side (exact), narrow again in torch.
    return {k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in tree_flatten(model.parameters())}


def mlx_to_hf(src, dst, dtype: Optional[str] = None, log=print) -> Path:
    """Write ``dst`` with ``ReGLAForCausalLM.save_pretrained`` (config.json model_type regla,
    model.safetensors) plus the tokenizer files; also turns an fla-hub gla/gsa folder into a regla one."""
    import torch

    from regla import checkpoint
    from regla.spec import ConfigError, check_weights
    from regla_torch.loading import model_from_weights

    dst = Path(dst)
    if dst.exists():
        raise ConvertError(f"{dst} already exists: choose a new output folder or remove it first")
    folder = checkpoint.resolve(src)
    raw = checkpoint.read_config(folder)
    args = checkpoint.read_args(folder)
    log(f"reading {folder} ({args.attn_type}, {args.num_hidden_layers} layers, d={args.hidden_size}"
        + (f", {raw['quantization']['bits']}-bit" if raw.get("quantization") else "") + ")")
    weights = checkpoint.sanitize(_weights_as_torch(folder, bool(raw.get("quantization"))), args)
    try:
        check_weights(weights, args)
    except ConfigError as e:
        raise ConvertError(f"{folder}: {e}") from None
    model = model_from_weights(args, weights)
    if dtype is not None:
        model = model.to(getattr(torch, TORCH_DTYPES[dtype]))
    with staged_output(dst) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(folder, tmp)
    log(f"wrote {dst}")
    return dst
