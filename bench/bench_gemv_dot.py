"""Experiments for #20's decode bar: two ways to keep more of a decode GEMV's weight reads in
flight than the library's kernel (``grouped_gemv``: elementwise products reduced at the end,
one register tile loaded before the grid dependency wait; Triton pipelines none of its loads:
the sm_90 PTX Triton 3.9 makes for it has no cp.async, num_stages changes nothing).

- ``dot``: the GEMV as a tensor-core product (x padded to 16 rows), since Triton's software
  pipeliner keeps STAGES weight tiles in flight (cp.async into shared memory) only for loads
  that feed a ``tl.dot``. H200, 2026-12-04: the step's 97 plain products 1,036 us against 879.
- ``smem``: in Gluon, each program copies its whole weight block into shared memory before the
  wait, then multiplies from there. H200, 2026-12-04: 770 us against 879 (BENCHMARKS section 1,
  "eleventh session"). With the library's folds (commit 528f0f7) it was slower: 1,237 us against
  941 for the step's projections, o and down at twice their time.
- ``smem-folds``: that kernel with f(x) (the folds) computed once a program into shared memory
  instead of by every warp (at 8 warps, 8x the elementwise work and fp32 divisions in the
  sigmoids). H200, 2026-12-04 (twelfth session): o 5.3 us and down 8.9 against 6.3 and 15.0, but
  the step's 97 folded projections 948 us against 941 for the library's call: the folds' serial
  work after the wait takes back what the copy before it wins.

    python bench/bench_gemv_dot.py [--variants dot smem smem-folds]

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


def _gluon():
    """(gluon, its language, its cp.async module, the cp.async load) or None where this Triton
    has no Gluon."""
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    except ImportError as e:
        print(f"no Gluon here: {e}")
        return None
    return gluon, gl, cp, getattr(cp, "async_load", None) or cp.async_copy_global_to_shared  # renamed after 3.6


def _smem_kernel():
    """A second way, written in Gluon (Triton's lower-level dialect: explicit layouts and shared
    memory): each program copies its whole [BN, K] weight block into shared memory (cp.async)
    before the grid dependency wait, so those reads are in flight while the kernel before
    finishes, then multiplies from shared memory. None where this Triton has no Gluon."""
    g = _gluon()
    if g is None:
        return None
    gluon, gl, cp, async_load = g

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


def _smem_folds_kernel():
    """``smem`` with the library GEMV's folds (gemv._tile: RMSNorm, silu(gate) * up, silu, the
    attention output's per-head norm, weight and gate, the residual) and its weight groups: the
    kernel of commit 528f0f7 (wired in, then removed: o and down ran at twice the Triton
    kernel's time) with one change. There every warp computed f(x) for every K block itself (x
    replicated across the warps of the block's layout: 8x the elementwise work at 8 warps, and
    fp32 divisions in the sigmoids); here f(x) is computed once a program, spread over all its
    threads, into shared memory, which the product loop reads. Written 2026-12-04 after the
    device time was spent; run the next session (the module docstring gives the result)."""
    g = _gluon()
    if g is None:
        return None
    gluon, gl, cp, async_load = g

    @gluon.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + gl.exp(-x))

    @gluon.jit(do_not_specialize=["n0", "n1", "n2", "n3", "n4", "n5"])
    def _gemv_smem_folds_kernel(x, y, w0, w1, w2, w3, w4, w5, n0, n1, n2, n3, n4, n5, nw, res, gt, K, eps,
                                G: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NK: gl.constexpr,
                                VEC: gl.constexpr, TK: gl.constexpr, XV: gl.constexpr, NORM: gl.constexpr,
                                GLU: gl.constexpr, RES: gl.constexpr, HEAD: gl.constexpr, HEAD_W: gl.constexpr,
                                GATE: gl.constexpr, SILU: gl.constexpr, EVEN: gl.constexpr):
        L: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TK, TK], [gl.num_warps(), 1], [1, 0])
        LX: gl.constexpr = gl.BlockedLayout([XV], [32], [gl.num_warps()], [0])
        gdc_launch_dependents()
        pid = gl.program_id(0)
        ws = (w0, w1, w2, w3, w4, w5)
        ns = (n0, n1, n2, n3, n4, n5)
        w, n_g, first, col = w0, n0, pid * 0, pid * 0
        end, off = gl.cdiv(n0, BN), n0
        for g in gl.static_range(1, G):
            if pid >= end:
                w, n_g, first, col = ws[g], ns[g], end, off
            end += gl.cdiv(ns[g], BN)
            off += ns[g]
        rn = (pid - first) * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, L))
        mn = rn < n_g
        ck = gl.arange(0, BK, layout=gl.SliceLayout(0, L))
        sw = gl.allocate_shared_memory(w0.dtype.element_ty, [NK, BN, BK], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        for i in gl.static_range(NK):  # the whole weight block in flight before the wait
            cols = i * BK + ck
            async_load(sw.index(i), w + rn[:, None].to(gl.int64) * K + cols[None, :], mn[:, None] & (cols < K)[None, :])
        cp.commit_group()
        gdc_wait()
        # f(x) once, over all threads, into shared memory
        sx = gl.allocate_shared_memory(gl.float32, [NK, BK], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        cx = gl.arange(0, BK, layout=LX)
        ss = gl.zeros([BK], gl.float32, LX)
        for i in gl.static_range(NK):
            cols = i * BK + cx
            mk = cols < K
            b_x = gl.load(x + cols, mask=mk, other=0.).to(gl.float32)
            if GLU:
                b_x = b_x * _sigmoid(b_x) * gl.load(x + K + cols, mask=mk, other=0.).to(gl.float32)
            if SILU:
                b_x = b_x * _sigmoid(b_x)
            if NORM:
                ss += b_x * b_x
                b_x *= gl.load(nw + cols, mask=mk, other=0.).to(gl.float32)
            if HEAD > 0:  # BK == HEAD: this block is one head
                b_x *= gl.rsqrt(gl.sum(b_x * b_x, axis=0) / HEAD + eps)
                if HEAD_W:
                    b_x *= gl.load(nw + cx).to(gl.float32)
                if GATE:
                    b_g = gl.load(gt + cols, mask=mk, other=0.).to(gl.float32)
                    b_x *= b_g * _sigmoid(b_g)
            sx.index(i).store(b_x)
        cp.wait_group(0)
        acc = gl.zeros([BN, BK], gl.float32, L)
        for i in gl.static_range(NK):
            b_w = sw.index(i).load(L).to(gl.float32)
            if not EVEN:  # past K: what the masked copy left there, times x's zeros, could be nan
                b_w = gl.where(((i * BK + ck) < K)[None, :], b_w, 0.)
            acc += b_w * sx.index(i).load(gl.SliceLayout(0, L))[None, :]
        b_y = gl.sum(acc, axis=1)
        if NORM:
            b_y *= gl.rsqrt(gl.sum(ss, axis=0) / K + eps)
        p_y = col + rn
        if RES:
            b_y += gl.load(res + p_y, mask=mn, other=0.).to(gl.float32)
        gl.store(y + p_y, b_y.to(y.dtype.element_ty), mask=mn)
    return _gemv_smem_folds_kernel


# launch shapes of the folds kernel by (N, K), as gemv.CFGS: rows a program, warps (528f0f7)
FOLD_CFGS = [(lambda N, K: K > 4096, (8, 8)), (lambda N, K: N <= 4096, (8, 8)), (lambda N, K: N <= 8192, (16, 4)),
             (lambda N, K: N <= 16384, (8, 4)), (lambda N, K: True, (16, 4))]


def smem_folds_gemv(kernel, x, weights, norm_weight=None, eps=1e-6, glu=False, residual=None, head_dim=0,
                    gate=None, silu=False, cfg=None):
    """``gemv.grouped_gemv``'s one-row call through the folds kernel; ``cfg`` (rows a program,
    warps) overrides FOLD_CFGS."""
    K = x.shape[1] // 2 if glu else x.shape[1]
    ns = [w.shape[0] for w in weights]
    BN, nw_ = cfg or next(c for test, c in FOLD_CFGS if test(sum(ns), K))
    BK = head_dim or min(512, triton.next_power_of_2(K))
    NK = triton.cdiv(K, BK)
    while BN > 1 and BN * NK * BK * x.element_size() > 112 * 1024:
        BN //= 2
    VEC = 16 // x.element_size()
    y = torch.empty(1, sum(ns), device=x.device, dtype=x.dtype)
    grid = (sum(triton.cdiv(n, BN) for n in ns),)
    nwt = x if norm_weight is None else norm_weight
    kernel[grid](x, y, *(list(weights) + [weights[0]] * (6 - len(ns))), *(ns + [0] * (6 - len(ns))), nwt,
                 x if residual is None else residual, x if gate is None else gate, K, eps, G=len(ns), BN=BN, BK=BK,
                 NK=NK, VEC=VEC, TK=min(32, BK // VEC), XV=max(1, BK // (32 * nw_)),
                 NORM=norm_weight is not None and not head_dim, GLU=glu, RES=residual is not None, HEAD=head_dim,
                 HEAD_W=bool(head_dim) and norm_weight is not None, GATE=gate is not None, SILU=silu,
                 EVEN=K % BK == 0, num_warps=nw_, launch_pdl=True)
    return y


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


SWEEP = [(bn, nw) for bn in (4, 8, 16) for nw in (4, 8)]


def folded_step(kernel, graph_us, grouped_gemv):
    """bench_gemv.py's shapes with their folds, the library's call against the folds kernel: each
    shape over its 24 copies at FOLD_CFGS's launch shape and at each of SWEEP's, then the step's 97
    in order (the folds kernel at each shape's best)."""
    from bench_gemv import SHAPES as FOLDED
    D = 512  # the attention output's head size (the "head" fold)
    calls, nbytes = {}, {}
    for name, (ns, K, fold) in FOLDED.items():
        torch.manual_seed(0)
        x = torch.randn(1, 2 * K if "glu" in fold else K, device="cuda", dtype=torch.bfloat16)
        layers = [[torch.randn(n, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for n in ns]
                  for _ in range(LAYERS)]
        nw = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
        res = torch.randn(1, sum(ns), device="cuda", dtype=torch.bfloat16) if "residual" in fold else None
        gate = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        if "head" in fold:
            kw = dict(norm_weight=nw[:D], residual=res, head_dim=D, gate=gate)
        else:
            kw = dict(norm_weight=nw if fold == "norm" else None, glu="glu" in fold, residual=res)
        lib = [lambda ws=ws, x=x, kw=kw: grouped_gemv(x, ws, **kw) for ws in layers]
        nbytes[name] = sum(ns) * K * 2
        t_lib = graph_us(lib)
        print(f"{name:20s} + {fold:14s} library {t_lib:6.1f} us", flush=True)
        r = lib[0]().float()
        best = None
        for cfg in [None] + SWEEP:
            ours = [lambda ws=ws, x=x, kw=kw, cfg=cfg: smem_folds_gemv(kernel, x, ws, cfg=cfg, **kw) for ws in layers]
            try:
                o = ours[0]().float()
                torch.cuda.synchronize()
                err = float((o - r).norm() / r.norm())
                t_our = graph_us(ours)
            except Exception as e:  # noqa: BLE001 (a shape the compiler or the GPU refuses)
                print(f"    {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            print(f"    folds kernel {cfg or 'FOLD_CFGS'}: {t_our:6.1f} us ({nbytes[name] / t_our / 1e3:5.0f} GB/s), "
                  f"rel err against the library {err:.1e}", flush=True)
            if err < 1e-2 and (best is None or t_our < best[0]):
                best = (t_our, ours)
        if best is None:
            print("    no launch shape ran within 1e-2 of the library: no step timing", flush=True)
            return
        calls[name] = (lib, best[1])
    order = ["in-proj (5 weights)", "gate+up (2)", "o", "down"]
    seq = [(n, i) for i in range(LAYERS) for n in order] + [("head", 0)]
    total = sum(nbytes[n] for n, _ in seq)
    for side, tag in ((0, "library"), (1, "folds kernel")):
        t = graph_us([calls[n][side][i] for n, i in seq]) * len(seq)
        print(f"a step's {len(seq)} projections with their folds, {total / 1e9:.2f} GB, {tag}: {t:.0f} us "
              f"({total / t / 1e3:.0f} GB/s)", flush=True)


def main():
    import argparse

    from bench_gemv import graph_us

    from regla_torch.ops.triton.gemv import grouped_gemv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["dot", "smem", "smem-folds"],
                    choices=["dot", "smem", "smem-folds"])
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
    smem_kernel = _smem_kernel() if "smem" in a.variants else None
    if smem_kernel is not None:
        variants["shared memory before the wait (Gluon)"] = (
            lambda x, w, y, cfg: smem_gemv(smem_kernel, x, w, y, cfg),
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
    folds_kernel = _smem_folds_kernel() if "smem-folds" in a.variants else None
    if folds_kernel is not None:
        folded_step(folds_kernel, graph_us, grouped_gemv)
    if not variants:
        return
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
