"""Experiments for #20's decode bar: two ways to keep more of a decode GEMV's weight reads in
flight than the library's kernel (``grouped_gemv``: elementwise products reduced at the end,
one register tile loaded before the grid dependency wait; Triton pipelines none of its loads:
the sm_90 PTX Triton 3.9 makes for it has no cp.async, num_stages changes nothing).

- ``dot``: the GEMV as a tensor-core product (x padded to 16 rows), since Triton's software
  pipeliner keeps STAGES weight tiles in flight (cp.async into shared memory) only for loads
  that feed a ``tl.dot``. H200, 2026-12-04: the step's 97 plain products 1,036 us against 879.
- ``smem``: in Gluon, each program copies its whole weight block into shared memory before the
  wait, then multiplies from there. H200, 2026-12-04: 770 us against 879 (BENCHMARKS section 1,
  "eleventh session"; with the library's folds it was slower, cause not found).

    python bench/bench_gemv_dot.py [--variants dot smem]

Both kernels launched with programmatic dependent launch as the decode path launches them (the
next kernel first, then the wait; the library's kernel also loads its first weight tile before
the wait: the pipeliner refuses a loop with the wait inside it, so the tensor-core kernel waits
before its loop and its pipeline fills after). Plain products (no norm, gating or residual),
the step's shapes (bench_gemv.py): each shape over its 24 layers' copies in one CUDA graph, then
the step's 97 products in order.
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from regla_torch.ops.triton._common import gdc_launch_dependents, gdc_wait  # noqa: E402

SHAPES = {"in-proj": (6160, 2048), "gate+up": (11264, 2048), "o": (2048, 2048), "down": (2048, 5632),
          "head": (32000, 2048)}
LAYERS = 24


@triton.jit
def _gemv_dot_kernel(x, w, y, N, K, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    """y = w @ x for one row x [K]: x as row 0 of a [16, BK] tile, each [BN, BK] weight tile a
    tensor-core product, STAGES tiles in flight."""
    gdc_launch_dependents()
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, 16)
    mn = rn < N
    gdc_wait()
    acc = tl.zeros([16, BN], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        b_w = tl.load(w + rn[:, None].to(tl.int64) * K + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.)
        b_x = tl.load(x + rm[:, None] * 0 + rk[None, :], mask=(rm[:, None] == 0) & mk[None, :], other=0.)
        acc = tl.dot(b_x, tl.trans(b_w), acc)
    tl.store(y + rn, tl.sum(tl.where(rm[:, None] == 0, acc, 0.), 0).to(y.dtype.element_ty), mask=mn)


def _smem_kernel():
    """A second way, written in Gluon (Triton's lower-level dialect: explicit layouts and shared
    memory): each program copies its whole [BN, K] weight block into shared memory (cp.async)
    before the grid dependency wait, so those reads are in flight while the kernel before
    finishes, then multiplies from shared memory. None where this Triton has no Gluon."""
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    except ImportError as e:
        print(f"no Gluon here: {e}")
        return None
    async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared  # renamed after 3.6

    @gluon.jit
    def _gemv_smem_kernel(x, w, y, N, K, BN: gl.constexpr, BK: gl.constexpr, NK: gl.constexpr):
        L: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
        S: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        gdc_launch_dependents()
        smem = gl.allocate_shared_memory(gl.bfloat16, [NK, BN, BK], S)
        rn = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, L))
        ck = gl.arange(0, BK, layout=gl.SliceLayout(0, L))
        mn = rn < N
        for i in gl.static_range(NK):
            cols = i * BK + ck
            async_load(smem.index(i), w + rn[:, None].to(gl.int64) * K + cols[None, :],
                       mn[:, None] & (cols < K)[None, :])
        cp.commit_group()
        gdc_wait()
        cp.wait_group(0)
        acc = gl.zeros([BN, BK], gl.float32, L)
        for i in gl.static_range(NK):
            cols = i * BK + ck
            b_x = gl.load(x + cols, mask=cols < K, other=0.).to(gl.float32)
            acc += smem.index(i).load(L).to(gl.float32) * b_x[None, :]
        gl.store(y + rn, gl.sum(acc, axis=1).to(y.dtype.element_ty), mask=mn)
    return _gemv_smem_kernel


def smem_gemv(kernel, x, w, y, cfg):
    N, K = w.shape
    kernel[(triton.cdiv(N, cfg["BN"]),)](x, w, y, N, K, BN=cfg["BN"], BK=cfg["BK"], NK=triton.cdiv(K, cfg["BK"]),
                                         num_warps=cfg["num_warps"], launch_pdl=True)
    return y


def dot_gemv(x, w, y, cfg):
    N, K = w.shape
    _gemv_dot_kernel[(triton.cdiv(N, cfg["BN"]),)](x, w, y, N, K, BN=cfg["BN"], BK=cfg["BK"], STAGES=cfg["STAGES"],
                                                   num_warps=cfg["num_warps"], launch_pdl=True)
    return y


def main():
    import argparse

    from bench_gemv import graph_us

    from regla_torch.ops.triton.gemv import grouped_gemv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["dot", "smem"], choices=["dot", "smem"])
    a = ap.parse_args()
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; us per call "
          f"({LAYERS} weight copies a shape, one CUDA graph)", flush=True)
    xs = {K: torch.randn(1, K, device=dev, dtype=bf) for K in (2048, 5632)}
    ws = {n: [torch.randn(N, K, device=dev, dtype=bf) / K ** 0.5 for _ in range(LAYERS)]
          for n, (N, K) in SHAPES.items()}
    ys = {n: torch.empty(1, N, device=dev, dtype=bf) for n, (N, K) in SHAPES.items()}
    variants = {}
    if "dot" in a.variants:
        variants["tensor-core pipelined"] = (dot_gemv, [dict(BN=BN, BK=BK, STAGES=S, num_warps=4) for BN in (16, 32, 64)
                                                        for BK in (128, 256) for S in (3, 4)])
    kernel = _smem_kernel() if "smem" in a.variants else None
    if kernel is not None:
        variants["shared memory before the wait (Gluon)"] = (
            lambda x, w, y, cfg: smem_gemv(kernel, x, w, y, cfg),
            [dict(BN=BN, BK=512, num_warps=nw) for BN in (4, 8, 16) for nw in (4, 8)])
    best = {v: {} for v in variants}
    for n, (N, K) in SHAPES.items():
        x = xs[K]
        ref = (x.float() @ ws[n][0].float().T)
        t_lib = graph_us([lambda w=w: grouped_gemv(x, [w]) for w in ws[n]])
        print(f"{n:8s} {N}x{K}: library {t_lib:6.1f} us ({N * K * 2 / t_lib / 1e3:5.0f} GB/s)", flush=True)
        for v, (fn, configs) in variants.items():
            for cfg in configs:
                try:
                    out = fn(x, ws[n][0], ys[n], cfg)
                    torch.cuda.synchronize()
                    err = float((out.float() - ref).norm() / ref.norm())
                    t = graph_us([lambda w=w: fn(x, w, ys[n], cfg) for w in ws[n]])
                except Exception as e:  # noqa: BLE001 (a shape the compiler or the GPU refuses)
                    print(f"  {v} {n} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                if err < 1e-2 and (n not in best[v] or t < best[v][n][0]):
                    best[v][n] = (t, cfg, err)
            if n in best[v]:
                t, cfg, err = best[v][n]
                print(f"    {v}: best {t:6.1f} us ({N * K * 2 / t / 1e3:5.0f} GB/s) at {cfg}, rel err {err:.1e}",
                      flush=True)
    order = ["in-proj", "gate+up", "o", "down"]
    seq = [(n, i) for i in range(LAYERS) for n in order] + [("head", 0)]
    nbytes = sum(SHAPES[n][0] * SHAPES[n][1] * 2 for n, _ in seq)
    t_lib = graph_us([lambda n=n, i=i: grouped_gemv(xs[SHAPES[n][1]], [ws[n][i]]) for n, i in seq]) * len(seq)
    print(f"a step's {len(seq)} plain products, {nbytes / 1e9:.2f} GB: library {t_lib:.0f} us "
          f"({nbytes / t_lib / 1e3:.0f} GB/s)", flush=True)
    for v, (fn, _) in variants.items():
        if len(best[v]) == len(SHAPES):
            t = graph_us([lambda n=n, i=i: fn(xs[SHAPES[n][1]], ws[n][i], ys[n], best[v][n][1])
                          for n, i in seq]) * len(seq)
            print(f"  {v}: {t:.0f} us ({nbytes / t / 1e3:.0f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
