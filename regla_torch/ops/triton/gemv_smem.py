"""The one-row decode GEMV (``gemv.grouped_gemv`` at batch 1) with each program's weight block
copied into shared memory before the grid dependency wait.

Under programmatic dependent launch a decode kernel starts while the one before it finishes, but
reads nothing that kernel wrote until ``gdc_wait``. The weights do not depend on it: this kernel
issues the copy of its whole [BN, K] weight block (``cp.async``, at most ~100 KB a program)
first, then waits, then multiplies from shared memory. The Triton kernel can keep only one
register tile in flight across the wait (more costs residency), and Triton pipelines loads into
shared memory only for ``tl.dot`` operands, never across the wait; so this one is written in
Gluon, Triton's lower-level dialect with explicit layouts and shared memory. On the H200 a step's
97 plain products took 770 us against 879 for the Triton kernel (bench/bench_gemv_dot.py).

Same folds as ``gemv._gemv_kernel`` (RMSNorm, gating, silu, residual, the attention output's
per-head norm and gate), one row only. Gluon does not run in Triton's interpreter: the kernel is
tested on the GPU only (tests/test_triton_gla.py's GEMV tests take this path on Hopper).
"""
from __future__ import annotations

import functools

import torch
import triton

from ._common import gdc_launch_dependents, gdc_wait, pdl_mode

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared  # renamed after 3.6
except ImportError:  # pragma: no cover (an older Triton: the Triton kernel runs)
    gluon = None

ENABLED = True  # False: the Triton kernel at batch 1 too (the benchmarks' comparison)
SMEM_BUDGET = 112 * 1024  # bytes of weights a program copies: two programs an SM at least

# Launch shapes by the product's shape (rows of W per program, warps), as gemv.CFGS; the K block
# is 512 (or the head size with the head norm). The best of bench_gemv_dot.py on the H200.
CFGS = [
    (lambda N, K: K > 4096, dict(BN=8, num_warps=8)),      # down
    (lambda N, K: N <= 4096, dict(BN=8, num_warps=8)),     # o
    (lambda N, K: N <= 8192, dict(BN=16, num_warps=4)),    # q, k, v, gates
    (lambda N, K: N <= 16384, dict(BN=8, num_warps=4)),    # gate + up
    (lambda N, K: True, dict(BN=16, num_warps=4)),         # head
]


@functools.lru_cache(maxsize=None)
def _major(index):
    return torch.cuda.get_device_capability(index)[0]


def usable(x: torch.Tensor, weights, K: int, head_dim: int) -> bool:
    """Whether the one-row product of x runs here: CUDA on Hopper or later under programmatic
    dependent launch, Gluon in this Triton, one row, whole heads in a block, and weight rows the
    compiler knows to start on 16 bytes (K a multiple of 16, as Triton specializes it, and
    16-byte aligned weights): cp.async copies at least 4 bytes."""
    return (ENABLED and gluon is not None and x.is_cuda and x.shape[0] == 1 and pdl_mode(x.device) > 0
            and _major(x.device.index) >= 9 and K % 16 == 0 and all(w.data_ptr() % 16 == 0 for w in weights)
            and (head_dim == 0 or head_dim * x.element_size() >= 16))


def launch_shape(N: int, K: int, head_dim: int, elem: int) -> dict | None:
    c = dict(next(c for test, c in CFGS if test(N, K)))
    c["BK"] = head_dim or min(512, triton.next_power_of_2(K))
    c["NK"] = triton.cdiv(K, c["BK"])
    while c["BN"] > 1 and c["BN"] * c["NK"] * c["BK"] * elem > SMEM_BUDGET:
        c["BN"] //= 2
    if c["BN"] * c["NK"] * c["BK"] * elem > SMEM_BUDGET:
        return None
    c["VEC"] = 16 // elem  # 16-byte copies
    c["TK"] = min(32, c["BK"] // c["VEC"])  # threads of a warp along K
    return c


if gluon is not None:
    @gluon.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + gl.exp(-x))

    # row counts stay runtime values (a count of 1 specialized to a constant would give one
    # group's branch a different type than the others'), as in gemv._gemv_kernel
    @gluon.jit(do_not_specialize=["n0", "n1", "n2", "n3", "n4", "n5"])
    def _gemv_smem_kernel(x, y, w0, w1, w2, w3, w4, w5, n0, n1, n2, n3, n4, n5, nw, res, gt, K, NY, eps,
                          G: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NK: gl.constexpr,
                          VEC: gl.constexpr, TK: gl.constexpr, NORM: gl.constexpr, GLU: gl.constexpr,
                          RES: gl.constexpr, HEAD: gl.constexpr, HEAD_W: gl.constexpr, GATE: gl.constexpr,
                          SILU: gl.constexpr, EVEN: gl.constexpr):
        """y[0, col_g + n] = f(x) @ w_g[n].T for this program's row block (the groups' blocks follow
        each other along the program axis); f as in gemv._tile, one row. With HEAD, BK == HEAD:
        every K block is one head."""
        L: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TK, TK], [gl.num_warps(), 1], [1, 0])
        LK: gl.constexpr = gl.SliceLayout(0, L)
        LN: gl.constexpr = gl.SliceLayout(1, L)
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
        rn = (pid - first) * BN + gl.arange(0, BN, layout=LN)
        mn = rn < n_g
        ck = gl.arange(0, BK, layout=LK)
        smem = gl.allocate_shared_memory(w0.dtype.element_ty, [NK, BN, BK],
                                         gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        for i in gl.static_range(NK):  # the whole block in flight before the wait
            cols = i * BK + ck
            _async_load(smem.index(i), w + rn[:, None].to(gl.int64) * K + cols[None, :],
                        mn[:, None] & (cols < K)[None, :])
        cp.commit_group()
        gdc_wait()  # x (and the residual, the gate) come from the kernels before
        cp.wait_group(0)
        acc = gl.zeros([BN, BK], gl.float32, L)
        ss = gl.zeros([BK], gl.float32, LK)
        for i in gl.static_range(NK):
            cols = i * BK + ck
            mk = cols < K
            b_x = gl.load(x + cols, mask=mk, other=0.).to(gl.float32)
            if GLU:
                b_x = b_x * _sigmoid(b_x) * gl.load(x + K + cols, mask=mk, other=0.).to(gl.float32)
            if SILU:
                b_x = b_x * _sigmoid(b_x)
            if NORM:
                ss += b_x * b_x
                b_x *= gl.load(nw + cols, mask=mk, other=0.).to(gl.float32)
            if HEAD > 0:
                b_x *= gl.rsqrt(gl.sum(b_x * b_x, axis=0) / HEAD + eps)
                if HEAD_W:
                    b_x *= gl.load(nw + ck).to(gl.float32)
                if GATE:
                    b_g = gl.load(gt + cols, mask=mk, other=0.).to(gl.float32)
                    b_x *= b_g * _sigmoid(b_g)
            b_w = smem.index(i).load(L).to(gl.float32)
            if not EVEN:  # past K: whatever the masked copy left there times x's zeros could be nan
                b_w = gl.where(mk[None, :], b_w, 0.)
            acc += b_w * b_x[None, :]
        b_y = gl.sum(acc, axis=1)
        if NORM:
            b_y *= gl.rsqrt(gl.sum(ss, axis=0) / K + eps)
        p_y = col + rn
        if RES:
            b_y += gl.load(res + p_y, mask=mn, other=0.).to(gl.float32)
        gl.store(y + p_y, b_y.to(y.dtype.element_ty), mask=mn)


def grouped_gemv_smem(x, y, weights, c, nw, res, gt, K, eps, norm, glu, residual, head_dim, head_w, gate, silu):
    """Launch for ``gemv.grouped_gemv`` (its checks done, x [1, K or 2K] contiguous, y [1, NY])."""
    G = len(weights)
    ns = [w.shape[0] for w in weights]
    ws = list(weights) + [weights[0]] * (6 - G)
    grid = (sum(triton.cdiv(n, c["BN"]) for n in ns),)
    _gemv_smem_kernel[grid](x, y, *ws, *(ns + [0] * (6 - G)), nw, res, gt, K, y.shape[1], eps, G=G,
                            BN=c["BN"], BK=c["BK"], NK=c["NK"], VEC=c["VEC"], TK=c["TK"], NORM=norm, GLU=glu,
                            RES=residual, HEAD=head_dim, HEAD_W=head_w, GATE=gate, SILU=silu,
                            EVEN=K % c["BK"] == 0,
                            num_warps=c["num_warps"], launch_pdl=True)
    return y
