"""Metal kernels for gated linear attention (forward only), built with ``mx.fast.metal_kernel``.

The kernel texts live in ``metal/*.metal``: each file is the body of one kernel,
``gla_common.h`` is the header. MLX writes the ``[[kernel]]`` signature around the body.
:func:`kernel_spec` is the single description of a launch (source, names, template
arguments, grid, threadgroup); :func:`metal_chunk_gla` and :func:`metal_recurrent_gla`
launch through it, and the CPU emulator of ``tests/metal_emu`` runs those same functions
with ``mx.fast.metal_kernel`` replaced, so it compiles exactly the text Metal compiles.

Every launch takes a packed batch: all sequences one after the other as rows of a
``[1, R, H, D]`` array with ``cu`` bounds (a plain ``[B, T]`` batch is B bounds T apart, the
same memory), so variable-length batches run in one launch per kernel.

This module imports nothing beyond the standard library and NumPy at import time (MLX is
imported inside the functions), and needs nothing from the rest of ``regla``: a converted
model folder may carry it next to a ``metal/`` folder of sources.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

HEAD_DIMS = (64, 128, 256)  # key head dims
VALUE_MULTIPLE = 64  # value head dims: any multiple of the 64-wide value tile (GLA 1.3B has V=512)
CHUNK = 64  # rows per chunk of the chunked kernels (the constant C inside them)
_DTYPES = ("float32", "float16", "bfloat16")

# name -> (source file, inputs, outputs)
KERNELS = {
    "chunk_h": ("gla_chunk_h.metal", ["k", "v", "g", "h0", "cu", "coff"], ["h", "ht"]),
    "chunk_a": ("gla_chunk_a.metal", ["q", "k", "g", "chunks"], ["A"]),
    "chunk_o": ("gla_chunk_o.metal", ["q", "v", "g", "A", "h", "chunks", "scale"], ["o"]),
    "recurrent": ("gla_recurrent_fwd.metal", ["q", "k", "v", "g", "h0", "cu", "scale"], ["o", "ht"]),
}


@functools.lru_cache(maxsize=None)
def read_source(filename: str) -> str:
    """Text of a Metal source file, from the first place that has it:

    1. a ``metal/`` folder next to this module (a model folder that carries ``kernels.py``
       and its sources, run by stock mlx-lm without regla installed);
    2. the ``metal/`` folder of the checkout this module sits in (running from the
       repository uses the repository's kernels, also when another regla is installed);
    3. the installed ``regla.metal`` package.
    """
    here = Path(__file__).resolve().parent
    for folder in (here / "metal", here.parent / "metal"):
        if (folder / filename).is_file():
            return (folder / filename).read_text()
    try:
        from importlib.resources import files

        return files("regla.metal").joinpath(filename).read_text()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"Metal source {filename!r} not found in {here / 'metal'}, {here.parent / 'metal'} or the "
            "installed regla.metal package; reinstall regla or copy the metal/ folder next to kernels.py") from e


def _dtype_name(dt) -> str:
    return str(dt).split(".")[-1]


MIN_MLX = (0, 32)  # older MLX cached a compiled custom kernel without its input dtypes


def _mlx_recent_enough() -> bool:
    import mlx.core as mx

    return tuple(int(x) for x in mx.__version__.split(".")[:2]) >= MIN_MLX


def supported(K: int, V: int, *dtypes) -> bool:
    """Whether these head dims and input dtypes have a kernel, with an MLX that runs it
    right (the ops fall back to plain MLX otherwise)."""
    return (K in HEAD_DIMS and V > 0 and V % VALUE_MULTIPLE == 0 and all(_dtype_name(d) in _DTYPES for d in dtypes)
            and _mlx_recent_enough())


def kernel_spec(kind: str, *, K: int, V: int, N: int = 1, H: int = 1, NT: int = 1, dtype: str = "float32") -> dict:
    """Everything needed to build and launch one kernel: ``kind`` of :data:`KERNELS`, head
    dims, N sequences, H heads, NT chunks (all sequences), ``dtype`` the output's (q's) dtype
    name. Template values are plain Python values (dtypes as names), so the emulator needs
    no MLX to read them."""
    if kind not in KERNELS:
        raise ValueError(f"unknown kernel {kind!r}; expected one of {sorted(KERNELS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {_DTYPES}")
    if K not in HEAD_DIMS or V <= 0 or V % VALUE_MULTIPLE:
        raise ValueError(f"head dims: K must be in {HEAD_DIMS} and V a multiple of {VALUE_MULTIPLE}, got K={K}, V={V}")
    filename, inputs, outputs = KERNELS[kind]
    launch = {
        # threadgroup per (32 key rows, 64 value columns, sequence, head), serial over chunks
        "chunk_h": ((256 * (K // 32), V // 64, N * H), (256, 1, 1), []),
        # threadgroup per (chunk, head)
        "chunk_a": ((256, NT, H), (256, 1, 1), []),
        # threadgroup per (64 value columns, chunk, head)
        "chunk_o": ((256 * (V // 64), NT, H), (256, 1, 1), [("OutT", dtype)]),
        # threadgroup per (32 value columns, sequence, head), serial over tokens
        "recurrent": ((V, 8, N * H), (32, 8, 1), [("OutT", dtype), ("K", int(K))]),
    }[kind]
    return dict(
        name="regla_" + filename.split(".")[0],
        source=read_source(filename),
        header=read_source("gla_common.h"),
        input_names=list(inputs),
        output_names=list(outputs),
        grid=launch[0],
        threadgroup=launch[1],
        template=launch[2],
    )


@functools.lru_cache(maxsize=None)
def _build(kind: str):
    import mlx.core as mx

    spec = kernel_spec(kind, K=HEAD_DIMS[0], V=VALUE_MULTIPLE)
    return mx.fast.metal_kernel(
        name=spec["name"],
        input_names=spec["input_names"],
        output_names=spec["output_names"],
        source=spec["source"],
        header=spec["header"],
        ensure_row_contiguous=True,
    )


@functools.lru_cache(maxsize=64)
def _plan(bounds: tuple):
    """Bookkeeping of a packed batch with sequence ``bounds`` (rows): ``cu`` [N+1] int32,
    ``coff`` [N+1] int32 (first chunk of each sequence, chunks numbered sequence by
    sequence), ``chunks`` [NT, 2] int32 (first row, end row) and NT. Cached: a plain batch
    of one shape gets the same arrays every call.

    Each array is padded to at least 8 elements (entries past the end are never read):
    MLX passes smaller inputs in the constant address space, as a separate kernel
    instantiation to compile; this way every batch uses the same one."""
    import mlx.core as mx

    def padded(a):
        rows = -(-8 // (a.shape[1] if a.ndim > 1 else 1))
        return np.pad(a, [(0, max(0, rows - len(a)))] + [(0, 0)] * (a.ndim - 1))

    cu = np.asarray(bounds, dtype=np.int32)
    counts = [(b - a + CHUNK - 1) // CHUNK for a, b in zip(bounds[:-1], bounds[1:])]
    coff = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    chunks = np.array([(t, min(t + CHUNK, b)) for a, b in zip(bounds[:-1], bounds[1:]) for t in range(a, b, CHUNK)],
                      dtype=np.int32).reshape(-1, 2)
    return mx.array(padded(cu)), mx.array(padded(coff)), mx.array(padded(chunks)), len(chunks)


def _prepare(q, k, v, g, initial_state, cu_seqlens):
    import mlx.core as mx

    if not mx.metal.is_available():
        raise RuntimeError("regla_mlx.kernels needs Metal (Apple Silicon); use regla_mlx.ops instead")
    if not _mlx_recent_enough():
        raise RuntimeError(f"regla's Metal kernels need MLX >= {'.'.join(map(str, MIN_MLX))} (older versions reuse "
                           f"a compiled kernel for other input dtypes); this is MLX {mx.__version__}: pip install -U mlx")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if tuple(k.shape) != (B, T, H, K) or tuple(g.shape) != (B, T, H, K) or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape}, g {g.shape} do not match")
    for x in (q, k, v, g):
        if _dtype_name(x.dtype) not in _DTYPES:
            raise ValueError(f"Metal GLA kernels take float32, float16 or bfloat16 inputs, got {x.dtype}")
    if cu_seqlens is None:
        bounds = tuple(range(0, B * T + 1, T)) if T else (0,) * (B + 1)
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens needs a packed batch (B == 1), got B = {B}")
        bounds = tuple(int(x) for x in cu_seqlens)
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {list(bounds)}")
    N = len(bounds) - 1
    if initial_state is None:
        h0 = mx.zeros((N, H, K, V), dtype=mx.float32)
    else:
        if tuple(initial_state.shape) != (N, H, K, V):
            raise ValueError(f"initial_state must be {(N, H, K, V)}, got {tuple(initial_state.shape)}")
        h0 = initial_state.astype(mx.float32)
    flat = [x.reshape(1, B * T, H, x.shape[-1]) for x in (q, k, v, g)]
    return flat, h0, bounds, (B, T, H, K, V, N)


def _template(spec):
    import mlx.core as mx

    return [(n, getattr(mx, val) if n == "OutT" else val) for n, val in spec["template"]]


def metal_chunk_gla(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunked GLA forward on Metal, ``[B,T,H,D]`` (B = 1 with ``cu_seqlens``): returns
    ``(o [B,T,H,V] in q's dtype, final state [N,H,K,V] f32 or None)``.

    Three launches: the intra-chunk scores (``chunk_a``) and the state entering every
    chunk (``chunk_h``), which do not depend on each other, then the output (``chunk_o``),
    parallel over chunks. States between chunks are kept in f32 ([NT, H, K, V])."""
    import mlx.core as mx

    (qf, kf, vf, gf), h0, bounds, (B, T, H, K, V, N) = _prepare(q, k, v, g, initial_state, cu_seqlens)
    cu, coff, chunks, NT = _plan(bounds)
    if NT == 0:
        return mx.zeros((B, T, H, V), q.dtype), (h0 if output_final_state else None)
    dims = dict(K=K, V=V, N=N, H=H, NT=NT, dtype=_dtype_name(q.dtype))
    sh = kernel_spec("chunk_h", **dims)
    h, ht = _build("chunk_h")(
        inputs=[kf, vf, gf, h0, cu, coff], template=_template(sh), grid=sh["grid"], threadgroup=sh["threadgroup"],
        output_shapes=[(NT, H, K, V), (N, H, K, V)], output_dtypes=[mx.float32, mx.float32])
    sa = kernel_spec("chunk_a", **dims)
    (A,) = _build("chunk_a")(
        inputs=[qf, kf, gf, chunks], template=_template(sa), grid=sa["grid"], threadgroup=sa["threadgroup"],
        output_shapes=[(NT, H, CHUNK, CHUNK)], output_dtypes=[mx.float32])
    so = kernel_spec("chunk_o", **dims)
    (o,) = _build("chunk_o")(
        inputs=[qf, vf, gf, A, h, chunks, mx.array(scale, dtype=mx.float32)], template=_template(so),
        grid=so["grid"], threadgroup=so["threadgroup"], output_shapes=[(1, B * T, H, V)], output_dtypes=[q.dtype])
    return o.reshape(B, T, H, V), (ht if output_final_state else None)


def metal_recurrent_gla(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Token-by-token GLA forward on Metal (decode): same contract as :func:`metal_chunk_gla`."""
    import mlx.core as mx

    (qf, kf, vf, gf), h0, bounds, (B, T, H, K, V, N) = _prepare(q, k, v, g, initial_state, cu_seqlens)
    cu, _, _, _ = _plan(bounds)
    s = kernel_spec("recurrent", K=K, V=V, N=N, H=H, dtype=_dtype_name(q.dtype))
    o, ht = _build("recurrent")(
        inputs=[qf, kf, vf, gf, h0, cu, mx.array(scale, dtype=mx.float32)], template=_template(s),
        grid=s["grid"], threadgroup=s["threadgroup"],
        output_shapes=[(1, B * T, H, V), (N, H, K, V)], output_dtypes=[q.dtype, mx.float32])
    return o.reshape(B, T, H, V), (ht if output_final_state else None)
