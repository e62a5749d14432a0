"""Metal kernels for gated linear attention (forward only), built with ``mx.fast.metal_kernel``.

The kernel texts live in ``metal/*.metal`` (package data ``regla.metal``): each file is the
body of one kernel, ``gla_common.h`` is the header. MLX writes the ``[[kernel]]`` signature
around the body. :func:`kernel_spec` is the single description of a launch (source, names,
template arguments, grid, threadgroup); the real path below and the CPU emulation harness
in ``tests/metal_emu`` both build from it, so the emulator compiles exactly the text Metal
compiles.

Nothing here touches Metal at import time: kernels are built on first use, so the module
imports on Linux, where ``mx.fast.metal_kernel`` is unavailable.
"""

from __future__ import annotations

import functools
from pathlib import Path

HEAD_DIMS = (64, 128, 256)  # key head dims (the state lives in registers: K/8 tiles)
VALUE_MULTIPLE = 64  # value head dims: any multiple of the 64-wide value tile (GLA 1.3B has V=512)
_DTYPES = ("float32", "float16", "bfloat16")

# Launch geometry; the constants C/BK/BV/NT inside gla_chunk_fwd.metal must agree.
CHUNK_THREADS = 256
CHUNK_VALUE_TILE = 64
RECURRENT_ROWS_PER_GROUP = 4

KERNELS = {
    "chunk": "gla_chunk_fwd.metal",
    "recurrent": "gla_recurrent_fwd.metal",
}
INPUT_NAMES = ["q", "k", "v", "g", "h0", "scale"]
OUTPUT_NAMES = ["o", "ht"]


@functools.lru_cache(maxsize=None)
def read_source(filename: str) -> str:
    """Text of ``metal/<filename>``: from the installed package, else next to this repo."""
    try:
        from importlib.resources import files

        return files("regla.metal").joinpath(filename).read_text()
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return (Path(__file__).resolve().parent.parent / "metal" / filename).read_text()


def _check(kind: str, dtype: str, K: int, V: int):
    if kind not in KERNELS:
        raise ValueError(f"unknown kernel {kind!r}; expected one of {sorted(KERNELS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {_DTYPES}")
    if K not in HEAD_DIMS or V <= 0 or V % VALUE_MULTIPLE:
        raise ValueError(f"head dims: K must be in {HEAD_DIMS} and V a multiple of {VALUE_MULTIPLE}, got K={K}, V={V}")


def supported(K: int, V: int, dtype) -> bool:
    """Whether these head dims and input dtype have a kernel (the op falls back otherwise)."""
    return K in HEAD_DIMS and V > 0 and V % VALUE_MULTIPLE == 0 and str(dtype).split(".")[-1] in _DTYPES


def kernel_spec(kind: str, dtype: str, K: int, V: int, B: int = 1, H: int = 1) -> dict:
    """Everything needed to build and launch one kernel instantiation.

    ``dtype`` is the output (= q's) dtype name: ``float32``, ``float16`` or ``bfloat16``.
    Template values are given as plain Python values with dtypes as names, so the
    emulator needs no MLX; :func:`_build` maps the names to ``mx`` dtypes.
    """
    _check(kind, dtype, K, V)
    if kind == "chunk":
        grid = (CHUNK_THREADS, V // CHUNK_VALUE_TILE, B * H)
        threadgroup = (CHUNK_THREADS, 1, 1)
    else:
        grid = (32, V, B * H)
        threadgroup = (32, RECURRENT_ROWS_PER_GROUP, 1)
    return dict(
        name=f"regla_gla_{kind}_fwd",
        source=read_source(KERNELS[kind]),
        header=read_source("gla_common.h"),
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        template=[("OutT", dtype), ("K", int(K)), ("V", int(V))],
        grid=grid,
        threadgroup=threadgroup,
    )


@functools.lru_cache(maxsize=None)
def _build(kind: str):
    import mlx.core as mx

    spec = kernel_spec(kind, "float32", 64, 64)
    return mx.fast.metal_kernel(
        name=spec["name"],
        input_names=spec["input_names"],
        output_names=spec["output_names"],
        source=spec["source"],
        header=spec["header"],
        ensure_row_contiguous=True,
    )


def _dtype_name(dt) -> str:
    name = str(dt).split(".")[-1]
    if name not in _DTYPES:
        raise ValueError(f"Metal GLA kernels take float32, float16 or bfloat16 inputs, got {dt}")
    return name


def _launch(kind, q, k, v, g, scale, initial_state, output_final_state):
    import mlx.core as mx

    if not mx.metal.is_available():
        raise RuntimeError("regla_mlx.kernels needs Metal (Apple Silicon); use regla_mlx.ops instead")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if tuple(k.shape) != (B, T, H, K) or tuple(g.shape) != (B, T, H, K) or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape}, g {g.shape} do not match")
    dtype = _dtype_name(q.dtype)
    for x in (k, v, g):
        _dtype_name(x.dtype)
    spec = kernel_spec(kind, dtype, K, V, B, H)
    if scale is None:
        scale = K ** -0.5
    scale = mx.array(scale, dtype=mx.float32).reshape(())
    if initial_state is None:
        h0 = mx.zeros((B, H, K, V), dtype=mx.float32)
    else:
        if tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(f"initial_state must be {(B, H, K, V)}, got {tuple(initial_state.shape)}")
        h0 = initial_state.astype(mx.float32)
    template = [(n, getattr(mx, val) if n == "OutT" else val) for n, val in spec["template"]]
    o, ht = _build(kind)(
        inputs=[q, k, v, g, h0, scale],
        template=template,
        grid=spec["grid"],
        threadgroup=spec["threadgroup"],
        output_shapes=[(B, T, H, V), (B, H, K, V)],
        output_dtypes=[q.dtype, mx.float32],
    )
    return o, (ht if output_final_state else None)


def metal_chunk_gla(q, k, v, g, scale, initial_state=None, output_final_state=False):
    """Chunked GLA forward on Metal: ``(o [B,T,H,V] in q's dtype, final state f32 or None)``."""
    return _launch("chunk", q, k, v, g, scale, initial_state, output_final_state)


def metal_recurrent_gla(q, k, v, g, scale, initial_state=None, output_final_state=False):
    """Token-by-token GLA forward on Metal (decode): same contract as :func:`metal_chunk_gla`."""
    return _launch("recurrent", q, k, v, g, scale, initial_state, output_final_state)
