"""fla's own GLA op test table, run on our ops and judged by fla's criterion.

The table is that of ``tests/ops/test_gla.py`` in fla-org/flash-linear-attention (shapes,
gate normalizers, dtypes, head dims, varlen boundaries, tolerances), ported as data. Inputs
are drawn the way fla draws them (q, k, v uniform in [0, 1) in the row's dtype, log gates
``logsigmoid(rand) / normalizer`` in that dtype, an fp32 initial state, a random output
and final-state gradient). The reference is a float64 recurrence of the same (rounded)
inputs, its outputs and gradients then held in the dtype autograd gives them (v's for o,
the leaves' for the gradients), as fla's test gets its reference. The criterion is
``fla.utils.assert_close``: pass when the largest absolute error is <= 1e-6, else the
relative RMS error ``||got - ref||_rms / ||ref||_rms`` must stay below the row's ratio
(0.004 for the chunk op's o, 0.005 for everything else).

On CUDA every row runs on the Triton kernels (recurrent rows on both ops). Without CUDA the
fp32 rows run on the plain torch and the plain MLX chunk ops, shrunk (see `shrink`) to keep
the CPU suite fast, and the rows of at most 64 tokens and head dim 128 on the Triton ops in
the interpreter; the other half-precision rows need the GPU (skipped with that reason).
"""
import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers_fla_ops import run_mlx, run_torch  # noqa: E402
from regla_torch.ops.naive import recurrent_gla_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

# (B, T, H, D, gate normalizer, dtype): fla's test_fused_recurrent and test_chunk
RECURRENT = [
    (1, 63, 1, 64, 1, "float32"),
    (2, 1024, 4, 60, 1, "float32"),
    (2, 1024, 8, 128, 0.1, "float32"),
    (2, 1024, 8, 128, 1, "float32"),
    (2, 1024, 8, 128, 10, "float32"),
    (4, 2048, 8, 64, 1, "float32"),
    (2, 1024, 8, 128, 0.1, "float16"),
    (2, 1024, 8, 128, 10, "float16"),
]
CHUNK = [
    (1, 63, 1, 64, 1, "float16"),
    (2, 1024, 4, 60, 1, "float16"),
    (2, 1024, 8, 128, 0.1, "float16"),
    (2, 1024, 8, 128, 1, "float16"),
    (2, 1024, 8, 128, 10, "float16"),
    (4, 2048, 8, 64, 1, "float16"),
    (1, 128, 4, 256, 1, "float16"),
    (1, 64, 2, 320, 1, "float16"),
    (1, 128, 4, 512, 1, "bfloat16"),
]
# (H, D, cu_seqlens, dtype): fla's test_fused_recurrent_varlen and test_chunk_varlen (normalizer 1)
RECURRENT_VARLEN = [
    (4, 64, [0, 15], "float32"),
    (4, 64, [0, 256, 500, 1000], "float32"),
    (4, 100, [0, 15, 100, 300, 1200, 2000], "float32"),
    (4, 64, [0, 1, 100, 300, 1200, 2048], "float16"),
    (4, 128, [0, 200, 512, 1200, 2048], "float16"),
]
CHUNK_VARLEN = [
    (4, 64, [0, 15], "float16"),
    (4, 64, [0, 0, 16], "float16"),
    (4, 64, [0, 256, 500, 1000], "float16"),
    (4, 100, [0, 15, 100, 300, 1200, 2000], "float16"),
]
RATIOS = {"recurrent": dict(o=0.005), "chunk": dict(o=0.004)}  # every other output: 0.005
NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "dh0")


def shrink(kind, row):
    """A CPU-sized version of a row: T / 8 (B = 1, at most 2 heads) and the varlen boundaries
    / 8, keeping the head dim, normalizer, dtype, ragged lengths and segment count."""
    if kind == "fixed":
        B, T, H, D, norm, dtype = row
        return (1, max(1, T // 8) if T > 64 else T, min(H, 2), D, norm, dtype)
    H, D, cu, dtype = row
    return (min(H, 2), D, cu if cu[-1] <= 64 else [c // 8 for c in cu], dtype)


def _cases():
    """(op, table, kind, row): fla's table on the Triton ops on CUDA. On CPU its fp32 rows
    (shrunk) on the plain torch and plain MLX chunk ops, its rows of at most 64 tokens and
    head dim 128 on the Triton ops in the interpreter (bf16 dots are wrong there: none of
    these rows is bf16), and the others listed as skipped."""
    rows = [("recurrent", "fixed", r) for r in RECURRENT] + [("recurrent", "varlen", r) for r in RECURRENT_VARLEN]
    rows += [("chunk", "fixed", r) for r in CHUNK] + [("chunk", "varlen", r) for r in CHUNK_VARLEN]
    out = []
    for table, kind, r in rows:
        triton_ops = ["recurrent", "chunk"] if table == "recurrent" else ["chunk"]
        small = (r[1] if kind == "fixed" else r[2][-1]) <= 64 and (r[3] if kind == "fixed" else r[1]) <= 128
        if CUDA:
            cases = [(op, r) for op in triton_ops]
        else:
            cases = [(op + "-interpreter", r) for op in triton_ops] if small else []
            if r[-1] == "float32":
                cases += [(op, shrink(kind, r)) for op in ("chunk-torch", "chunk-mlx")]
            if not cases:
                cases = [("triton", r)]
        for op, row in cases:
            name = (f"{op}-{table}-B{row[0]}-T{row[1]}-H{row[2]}-D{row[3]}-n{row[4]}-{row[5]}" if kind == "fixed"
                    else f"{op}-{table}-varlen-H{row[0]}-D{row[1]}-cu{'_'.join(map(str, row[2]))}-{row[3]}")
            marks = [pytest.mark.skip(reason="a half-precision row too large for the interpreter: on the "
                                             "Triton kernels on CUDA only")] \
                if op == "triton" else []
            out.append(pytest.param(op, table, kind, row, id=name, marks=marks))
    return out


def make_row(table, kind, row):
    """The row's inputs as fla draws them (seed 42, on the test device)."""
    if kind == "fixed":
        B, T, H, D, norm, dtype = row
        cu = None
    else:
        H, D, cu, dtype = row
        B, T, norm = 1, cu[-1], 1
    dtype = getattr(torch, dtype)
    gen = torch.Generator(device=DEV).manual_seed(42)
    rand = lambda *s, dt=dtype: torch.rand(s, generator=gen, device=DEV, dtype=dt)
    q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
    g = torch.nn.functional.logsigmoid(rand(B, T, H, D)) / norm
    N = B if cu is None else len(cu) - 1
    h0 = rand(N, H, D, D, dt=torch.float32)
    do = torch.randn(B, T, H, D, generator=gen, device=DEV, dtype=dtype)
    if table == "chunk" and kind == "varlen":
        dht = rand(N, H, D, D, dt=torch.float32)
    else:
        dht = torch.randn(N, H, D, D, generator=gen, device=DEV,
                          dtype=torch.float32 if table == "chunk" else dtype)
    return q, k, v, g, h0, do, dht, cu


def fla_close(name, ref, got, ratio):
    """fla.utils.assert_close, in float64: an absolute error <= 1e-6 passes outright."""
    ref, got = ref.double().cpu(), got.double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = got - ref
    if err.abs().max().item() <= 1e-6:
        return
    ratio_got = err.pow(2).mean().sqrt().item() / (ref.pow(2).mean().sqrt().item() + 1e-8)
    assert ratio_got < ratio, f"{name}: rel. RMS {ratio_got:.3e} >= {ratio}"


@functools.lru_cache(maxsize=4)
def _row_and_reference(table, kind, row):
    x = make_row(table, kind, [list(r) if isinstance(r, tuple) else r for r in row])
    return x, recurrent_gla_reference(*x[:7], cu_seqlens=x[7])


@pytest.mark.parametrize("op,table,kind,row", _cases())
def test_fla_gla_table(op, table, kind, row):
    # one reference per row, shared by the ops that run it
    (q, k, v, g, h0, do, dht, cu), ref = _row_and_reference(
        table, kind, tuple(tuple(r) if isinstance(r, list) else r for r in row))
    if op == "chunk-mlx":
        got = run_mlx(q, k, v, g, h0, do, dht, cu)
    else:
        got = run_torch(op.replace("chunk-torch", "chunk"), q, k, v, g, h0, do, dht, cu)
    # held as autograd holds them: o in v's dtype, the gradients in their leaves' dtypes
    dtypes = (v.dtype, torch.float32, q.dtype, k.dtype, v.dtype, g.dtype, h0.dtype)
    ratios = RATIOS["chunk" if op.startswith("chunk") else "recurrent"]
    for name, r, x, dt in zip(NAMES, ref, got, dtypes):
        assert tuple(x.shape) == tuple(r.shape), name
        fla_close(name, r.to(dt), x, ratios.get(name, 0.005))
