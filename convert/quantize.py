"""Quantization as mlx-lm does it: ``nn.quantize`` through ``mlx_lm.utils.quantize_model``,
recorded as ``{"quantization": {"group_size", "bits"}}`` in config.json."""

from __future__ import annotations

BITS = (2, 3, 4, 6, 8)


def quantize(model, config: dict, bits: int, group_size: int) -> dict:
    """Quantize ``model`` in place; returns the config with its ``quantization`` entry.

    mlx-lm's predicate already leaves alone every layer whose input width does not divide into
    groups (the rank-16 gate projections ``gk_proj.1`` / ``gr_proj.1``, for instance), so they
    stay in full precision and the loader recognises them by their missing ``.scales``.
    """
    from mlx_lm.utils import quantize_model

    from .common import ConvertError

    if bits not in BITS:
        raise ConvertError(f"--q-bits {bits} is not supported by MLX: use one of {', '.join(map(str, BITS))}")
    if group_size not in (32, 64, 128):
        raise ConvertError(f"--q-group-size {group_size} is not supported by MLX: use 32, 64 or 128")
    _, config = quantize_model(model, config, group_size=group_size, bits=bits)
    return config


def dequantize(model):
    """Every quantized layer back to a plain one (``mlx_lm.utils.dequantize_model``)."""
    from mlx_lm.utils import dequantize_model

    return dequantize_model(model)
