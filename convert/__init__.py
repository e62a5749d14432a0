"""Checkpoint conversion (installed as ``regla.convert``): HF torch <-> MLX, fla-hub gla/gsa
import, quantization. Framework imports happen inside the functions, so the CLI stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .common import ConvertError, staged_output

DTYPES = ("bf16", "f16", "f32")


def convert(src, dst, to: str = "mlx", dtype: Optional[str] = None, q_bits: Optional[int] = None,
            q_group_size: int = 64, log=print) -> Path:
    """Convert ``src`` (folder or hub repo id) into a new folder ``dst``.

    Raises ``ConvertError`` (one line naming the problem and the fix) for every expected failure,
    and never leaves ``dst`` behind when it fails.
    """
    from regla.checkpoint import CheckpointError
    from regla.spec import ConfigError

    if to not in ("mlx", "hf"):
        raise ConvertError(f"--to {to!r}: choose mlx or hf")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if q_bits and to != "mlx":
        raise ConvertError("--q-bits applies to MLX output only: use --to mlx")
    try:
        if to == "mlx":
            from .hf_to_mlx import hf_to_mlx

            return hf_to_mlx(src, dst, dtype, q_bits, q_group_size, log=log)
        from .mlx_to_hf import mlx_to_hf

        return mlx_to_hf(src, dst, dtype, log=log)
    except (CheckpointError, ConfigError) as e:
        raise ConvertError(str(e)) from None


__all__ = ["ConvertError", "convert", "staged_output"]
