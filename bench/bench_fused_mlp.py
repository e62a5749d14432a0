"""Experiment for #20's decode bar: a layer's MLP (RMSNorm, gate and up, silu(gate) * up, down)
as one launch at batch 1, against the library's two (``grouped_gemv`` with the norm, then with
the gating and the residual).

A kernel boundary under programmatic dependent launch costs ~3.7 us a step's projection
(BENCHMARKS section 1, eleventh session), and every boundary tried in place of it (counters,
tickets, a grid barrier) cost more, because each made programs wait on other programs. Split
over the MLP's inner dimension instead, no program waits on another: program p computes its
slice of h = silu(x W_g^T) * (x W_u^T) (BI of the 5632 entries, from its own rows of W_g and
W_u), multiplies it by the matching columns of W_d and adds its partial [2048] output into an
fp32 accumulator with atomics. The consumer (the next layer's input projection) would read
``residual + acc``; the accumulator zeroed by a later kernel. Only the atomics are new cost:
5632 / BI partial outputs of 2048 floats a layer. H200, 2026-12-04: best 24.2 us a layer against
22.9 for the library's two launches (BENCHMARKS section 1, twelfth session): not wired in.

    python bench/bench_fused_mlp.py [--quick]
    TRITON_INTERPRET=1 python bench/bench_fused_mlp.py --cpu-check  # here: against the library's pair

Both layouts of W_d run: as stored ([2048, 5632]: a program reads BI * 2 bytes a row) and
transposed ([5632, 2048], as the decode path could keep it: a program's slice is contiguous rows).
Prints each launch shape's time for the 24 layers' copies in one CUDA graph (us a layer) and its
error against the library's pair.
"""
import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from regla_torch.ops.triton._common import pdl_mode, pdl_start, pdl_wait  # noqa: E402

LAYERS = 24


@triton.jit
def _mlp_kernel(x, nw, wg, wu, wd, acc, K, I, N, eps, BI: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                DT: tl.constexpr, PDL: tl.constexpr):
    """acc += W_d[:, slice] (silu(g) * u)[slice] for this program's slice of the inner dimension,
    g and u the rows of W_g and W_u of that slice times rmsnorm(x) (rounded to x's dtype, as the
    library's gate+up GEMV writes them). K a multiple of BK, N of BN."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    ri = pid * BI + tl.arange(0, BI)
    mi = ri < I
    rk = tl.arange(0, BK)
    p_g = wg + ri[:, None].to(tl.int64) * K + rk[None, :]
    p_u = wu + ri[:, None].to(tl.int64) * K + rk[None, :]
    b_g = tl.load(p_g, mask=mi[:, None], other=0.)  # the weights' first tiles before the wait
    b_u = tl.load(p_u, mask=mi[:, None], other=0.)
    pdl_wait(PDL)
    ag = tl.zeros([BI, BK], dtype=tl.float32)
    au = tl.zeros([BI, BK], dtype=tl.float32)
    ss = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        if k0 > 0:
            b_g = tl.load(p_g + k0, mask=mi[:, None], other=0.)
            b_u = tl.load(p_u + k0, mask=mi[:, None], other=0.)
        b_x = tl.load(x + k0 + rk).to(tl.float32)
        ss += b_x * b_x
        b_x *= tl.load(nw + k0 + rk).to(tl.float32)
        ag += b_g.to(tl.float32) * b_x[None, :]
        au += b_u.to(tl.float32) * b_x[None, :]
    r = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    g = (tl.sum(ag, 1) * r).to(x.dtype.element_ty).to(tl.float32)
    u = (tl.sum(au, 1) * r).to(x.dtype.element_ty).to(tl.float32)
    h = tl.where(mi, g * tl.sigmoid(g) * u, 0.)
    rn = tl.arange(0, BN)
    for n0 in range(0, N, BN):
        if DT:  # W_d^T [I, N]: this slice's rows
            b_d = tl.load(wd + ri[:, None].to(tl.int64) * N + (n0 + rn)[None, :], mask=mi[:, None], other=0.)
            part = tl.sum(b_d.to(tl.float32) * h[:, None], 0)
        else:   # W_d [N, I]: this slice's columns
            b_d = tl.load(wd + (n0 + rn)[:, None].to(tl.int64) * I + ri[None, :], mask=mi[None, :], other=0.)
            part = tl.sum(b_d.to(tl.float32) * h[None, :], 1)
        tl.atomic_add(acc + n0 + rn, part, sem="relaxed")


def fused_mlp(x, nw, wg, wu, wd, acc, cfg, eps=1e-6, down_t=False):
    K, I = x.shape[1], wg.shape[0]
    N = wd.shape[1] if down_t else wd.shape[0]
    pdl = pdl_mode(x.device)
    _mlp_kernel[(triton.cdiv(I, cfg["BI"]),)](x, nw, wg, wu, wd, acc, K, I, N, eps, BI=cfg["BI"], BK=cfg["BK"],
                                              BN=cfg["BN"], DT=down_t, PDL=pdl, num_warps=cfg["num_warps"],
                                              launch_pdl=pdl > 0)
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few launch shapes only")
    ap.add_argument("--cpu-check", action="store_true", help="small shapes in Triton's interpreter (TRITON_INTERPRET=1)")
    a = ap.parse_args()
    from regla_torch.ops.triton.gemv import grouped_gemv
    dev = "cpu" if a.cpu_check else "cuda"
    dt = torch.float32 if a.cpu_check else torch.bfloat16
    D, I = (64, 96) if a.cpu_check else (2048, 5632)
    torch.manual_seed(0)
    x = torch.randn(1, D, device=dev, dtype=dt)
    res = torch.randn(1, D, device=dev, dtype=dt)
    nw = (torch.rand(D, device=dev) + 0.5).to(dt)
    layers = [(torch.randn(I, D, device=dev, dtype=dt) / D ** 0.5, torch.randn(I, D, device=dev, dtype=dt) / D ** 0.5,
               torch.randn(D, I, device=dev, dtype=dt) / I ** 0.5) for _ in range(1 if a.cpu_check else LAYERS)]
    layers_t = [(g, u, d.t().contiguous()) for g, u, d in layers]
    accs = [torch.zeros(1, D, device=dev, dtype=torch.float32) for _ in layers]

    def library(g, u, d):
        return grouped_gemv(grouped_gemv(x, [g, u], nw), [d], glu=True, residual=res)
    ref = library(*layers[0]).float()
    if a.cpu_check:
        for down_t, ls in ((False, layers), (True, layers_t)):
            for cfg in (dict(BI=16, BK=32, BN=16, num_warps=4), dict(BI=64, BK=64, BN=64, num_warps=4)):
                accs[0].zero_()
                out = res.float() + fused_mlp(x, nw, *ls[0], accs[0], cfg, down_t=down_t)
                err = float((out - ref).norm() / ref.norm())
                print(f"down_t={down_t} {cfg}: rel err {err:.1e}")
                assert err < 1e-5, err
        return
    from bench_gemv import graph_us
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; a layer's MLP "
          f"{D}->{I}->{D}, {LAYERS} layers' copies in one CUDA graph, us a layer", flush=True)
    nbytes = 3 * I * D * 2
    t = graph_us([lambda ls=ls: library(*ls) for ls in layers])
    print(f"library (two launches): {t:6.1f} us ({nbytes / t / 1e3:5.0f} GB/s)", flush=True)
    if a.quick:
        shapes = [dict(BI=BI, BK=256, BN=256, num_warps=4) for BI in (16, 32)]
    else:
        shapes = [dict(BI=BI, BK=BK, BN=BN, num_warps=w) for BI, BK, BN, w in
                  itertools.product((8, 16, 32, 64), (256, 512), (128, 256, 512), (4, 8)) if BI * BK <= 16384]
    best = {}
    for down_t, ls in ((False, layers), (True, layers_t)):
        for cfg in shapes:
            try:
                accs[0].zero_()
                out = res.float() + fused_mlp(x, nw, *ls[0], accs[0], cfg, down_t=down_t)
                torch.cuda.synchronize()
                err = float((out.to(dt).float() - ref).norm() / ref.norm())
                t = graph_us([lambda ls=ls, acc=acc, cfg=cfg: fused_mlp(x, nw, *ls, acc, cfg, down_t=down_t)
                              for ls, acc in zip(ls, accs)])
            except Exception as e:  # noqa: BLE001 (a shape the compiler or the GPU refuses)
                print(f"  down_t={down_t} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            print(f"  one launch, down_t={down_t} {cfg}: {t:6.1f} us ({nbytes / t / 1e3:5.0f} GB/s), "
                  f"rel err {err:.1e}", flush=True)
            if err < 1e-2 and (down_t not in best or t < best[down_t][0]):
                best[down_t] = (t, cfg)
    for down_t, (t, cfg) in best.items():
        print(f"best one launch, down_t={down_t}: {t:6.1f} us at {cfg}", flush=True)


if __name__ == "__main__":
    main()
