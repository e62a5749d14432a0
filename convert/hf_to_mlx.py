"""Hugging Face / fla-hub checkpoint -> mlx-lm style MLX folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .bundle import MODEL_FILE, write_bundle
from .common import ConvertError, copy_tokenizer, staged_output


def hf_to_mlx(src, dst, dtype: Optional[str] = None, q_bits: Optional[int] = None, q_group_size: int = 64,
              log=print) -> Path:
    """Write ``dst``: config.json (model_type regla, attn_type, ``quantization`` when quantized,
    ``model_file``), ``model*.safetensors`` + index (mlx-lm's ``save_model``), tokenizer files and
    the model's own code (``bundle.write_bundle``), so stock ``mlx_lm.generate --trust-remote-code``
    runs it with only mlx and mlx-lm installed."""
    from mlx_lm.utils import save_config, save_model

    from regla import checkpoint
    from regla_mlx.generate import load_model

    from .quantize import quantize

    dst = Path(dst)
    if dst.exists():  # checked before any download or reading
        raise ConvertError(f"{dst} already exists: choose a new output folder or remove it first")
    folder = checkpoint.resolve(src)
    raw = checkpoint.read_config(folder)
    if raw.get("quantization") and q_bits:
        raise ConvertError(f"{src} is already quantized ({raw['quantization']['bits']} bits): quantize "
                           "from the full-precision checkpoint instead")
    args = checkpoint.read_args(folder)
    log(f"reading {folder} ({args.attn_type}, {args.num_hidden_layers} layers, d={args.hidden_size})")
    model = load_model(folder, dtype)
    config = args.to_dict()
    config["model_file"] = MODEL_FILE
    if raw.get("quantization"):
        config["quantization"] = raw["quantization"]
    if q_bits:
        config = quantize(model, config, q_bits, q_group_size)
    with staged_output(dst) as tmp:
        save_model(tmp, model)
        write_bundle(tmp)
        save_config(config, tmp / "config.json")
        copy_tokenizer(folder, tmp)
    log(f"wrote {dst}")
    return dst
