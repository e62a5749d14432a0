"""Decode-time projections: ``x @ W.T`` for a few rows of x, several weights in one launch,
with the block's pre-norm, the MLP's gating and the residual add folded in.

At batch 1 a decode step is matrix-vector products that read every weight once, and a layer
is only a few dozen microseconds of reading: cuBLAS runs small ones far under the memory
bandwidth (five projections of a 1.3B layer, 25 MB: 50 us, 0.5 TB/s on the H200), mostly
launch and ramp-up, and each elementwise kernel between them (a norm, a residual add) costs
a launch and a gap as long as a small GEMV. This kernel reads up to six weights of one input
(q, k, v, the gates' first factors, the output gate) in one launch, in row blocks spread over
the whole GPU, with fp32 accumulation, and takes what sits next to the products with it:

- ``norm_weight``: RMSNorm of x first. ``W (x * r * w) = r * (W (x * w))`` for the row's
  ``r = rsqrt(mean(x^2) + eps)``: the loop accumulates ``x^2`` beside the products and
  scales once at the end, so the norm adds no pass over x.
- ``glu``: x is ``[gate | up]`` (2K wide) and the product is with ``silu(gate) * up``.
- ``residual``: the output is ``residual + x @ W.T`` (the block's residual stream).
- ``head_dim``: x is an attention layer's output, heads of ``head_dim`` side by side, and the
  product is with ``rmsnorm_per_head(x) * head_weight * silu(gate)``: the output norm and gate
  that sat between the decode step and the o projection as two more kernels a layer. A K
  block holds whole heads, so each program normalizes the heads it reads itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pdl_mode, pdl_start, pdl_wait

MAX_GROUPS = 6
MAX_ROWS = 4  # x rows (batch size at decode) the broadcast product handles well
# Under PDL, load each program's first weight tile before waiting for the kernel before
# (the benchmarks' switch; bench/bench_gemv.py times both).
EARLY = True


@triton.jit
def _tile(acc, ss, b_w, k0, x, nw, gt, GS, rm, mm, K, XS, eps, BM: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
          GLU: tl.constexpr, HEAD: tl.constexpr, HEAD_W: tl.constexpr, GATE: tl.constexpr, SILU: tl.constexpr):
    """One K block: x's block transformed (gating, silu, norm, head norm and gate), times the weights'."""
    rk = k0 + tl.arange(0, BK)
    mk = rk < K
    mx = mm[:, None] & mk[None, :]
    b_x = tl.load(x + rm[:, None] * XS + rk[None, :], mask=mx, other=0.).to(tl.float32)
    if GLU:
        b_u = tl.load(x + rm[:, None] * XS + K + rk[None, :], mask=mx, other=0.).to(tl.float32)
        b_x = b_x * tl.sigmoid(b_x) * b_u
    if SILU:
        b_x = b_x * tl.sigmoid(b_x)
    if NORM:
        ss += b_x * b_x
        b_x *= tl.load(nw + rk, mask=mk, other=0.).to(tl.float32)[None, :]
    if HEAD > 0:
        b_h = tl.reshape(b_x, (BM, BK // HEAD, HEAD))
        b_r = tl.rsqrt(tl.sum(b_h * b_h, 2) / HEAD + eps)
        b_x = tl.reshape(b_h * b_r[:, :, None], (BM, BK))
        if HEAD_W:
            b_x *= tl.load(nw + rk % HEAD).to(tl.float32)[None, :]
        if GATE:
            b_g = tl.load(gt + rm[:, None] * GS + rk[None, :], mask=mx, other=0.).to(tl.float32)
            b_x *= b_g * tl.sigmoid(b_g)
    acc += b_x[:, None, :] * b_w.to(tl.float32)[None, :, :]
    return acc, ss


# Row counts stay runtime values: a count of 1 specialized to a constant would give one
# group's branch a different type than the others'. K must stay specialized (divisible by
# 16), or the weight rows lose their alignment and the loads their 16-byte width.
@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "n4", "n5", "M"])
def _gemv_kernel(x, y, w0, w1, w2, w3, w4, w5, n0, n1, n2, n3, n4, n5, nw, res, gt, GS, M, K, XS, NY, eps,
                 G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 NORM: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                 HEAD: tl.constexpr, HEAD_W: tl.constexpr, GATE: tl.constexpr, SILU: tl.constexpr,
                 PDL: tl.constexpr, EARLY: tl.constexpr):
    """y[:, off_g + n] = f(x) @ w_g[n].T for the row block this program owns; the groups' row
    blocks follow each other along the program axis, their outputs along y's columns."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    w = w0
    n_g = n0
    first = pid * 0  # first program of this group
    col = pid * 0    # first column of this group in y
    b1 = tl.cdiv(n0, BN)
    if G > 1:
        if pid >= b1:
            w, n_g, first, col = w1, n1, b1, n0
        b2 = b1 + tl.cdiv(n1, BN)
        if G > 2:
            if pid >= b2:
                w, n_g, first, col = w2, n2, b2, n0 + n1
            b3 = b2 + tl.cdiv(n2, BN)
            if G > 3:
                if pid >= b3:
                    w, n_g, first, col = w3, n3, b3, n0 + n1 + n2
                b4 = b3 + tl.cdiv(n3, BN)
                if G > 4:
                    if pid >= b4:
                        w, n_g, first, col = w4, n4, b4, n0 + n1 + n2 + n3
                    b5 = b4 + tl.cdiv(n4, BN)
                    if G > 5:
                        if pid >= b5:
                            w, n_g, first, col = w5, n5, b5, n0 + n1 + n2 + n3 + n4
    rn = (pid - first) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    mn = rn < n_g
    mm = rm < M
    p_w = w + rn[:, None].to(tl.int64) * K
    rk = tl.arange(0, BK)
    # the weights do not depend on the kernel before: under PDL (_common.PDL) the first tile's
    # loads issue before the wait, while that kernel's last programs finish (EARLY)
    if EARLY:
        b_w = tl.load(p_w + rk[None, :], mask=mn[:, None] & (rk < K)[None, :], other=0.)
    pdl_wait(PDL)  # launched while the previous kernel finishes: x comes from it
    if not EARLY:
        b_w = tl.load(p_w + rk[None, :], mask=mn[:, None] & (rk < K)[None, :], other=0.)
    # products accumulate elementwise and are reduced once at the end: the loop is only
    # loads and multiply-adds, so the next block's loads can issue while this one computes
    acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
    ss = tl.zeros([BM, BK], dtype=tl.float32)
    acc, ss = _tile(acc, ss, b_w, 0, x, nw, gt, GS, rm, mm, K, XS, eps, BM, BK, NORM, GLU, HEAD, HEAD_W, GATE, SILU)
    for k0 in range(BK, K, BK):
        rk = k0 + tl.arange(0, BK)
        b_w = tl.load(p_w + rk[None, :], mask=mn[:, None] & (rk < K)[None, :], other=0.)
        acc, ss = _tile(acc, ss, b_w, k0, x, nw, gt, GS, rm, mm, K, XS, eps, BM, BK, NORM, GLU, HEAD, HEAD_W, GATE, SILU)
    b_y = tl.sum(acc, 2)
    if NORM:
        b_y *= tl.rsqrt(tl.sum(ss, 1) / K + eps)[:, None]
    my = mm[:, None] & mn[None, :]
    p_y = rm[:, None] * NY + col + rn[None, :]
    if RES:
        b_y += tl.load(res + p_y, mask=my, other=0.).to(tl.float32)
    tl.store(y + p_y, b_y.to(y.dtype.element_ty), mask=my)


# Launch shapes (rows of W per program, K block, warps, pipeline stages) by the shape of the
# product: the best of `bench/bench_gemv.py --tune` on the H200 for a 1.3B model's layer (o
# retuned 2026-12-03 after its head norm moved in: 6.4 against 7.7 us at the earlier shape).
# Keyed by (total rows N, K); the first entry whose bounds hold wins.
CFGS = [
    (lambda N, K: K > 4096, dict(BN=4, BK=2048, num_warps=4, num_stages=1)),    # down (K = 5632)
    (lambda N, K: N <= 4096, dict(BN=4, BK=1024, num_warps=8, num_stages=1)),   # o (2048), head norm folded in
    (lambda N, K: N <= 8192, dict(BN=16, BK=512, num_warps=4, num_stages=1)),   # q,k,v,gates (6160)
    (lambda N, K: N <= 16384, dict(BN=32, BK=256, num_warps=4, num_stages=1)),  # gate+up (11264)
    (lambda N, K: True, dict(BN=8, BK=512, num_warps=4, num_stages=1)),         # head (32000)
]


def config(N: int, K: int) -> dict:
    return next(dict(c) for test, c in CFGS if test(N, K))


def grouped_gemv(x: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-6, glu: bool = False, residual: torch.Tensor | None = None,
                 head_dim: int = 0, gate: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """``torch.cat([f(x) @ w.T for w in weights], -1) (+ residual)`` for x [M, K] with M <= 4
    rows and up to six contiguous weights [N_g, K] of x's dtype, where f is nothing, the
    RMSNorm with ``norm_weight`` [K] (of ``silu(x)`` with ``silu``: GSA's output), or (``glu``,
    x [M, 2K]) ``silu(x[:, :K]) * x[:, K:]``, or
    (``head_dim`` > 0, a power of two dividing K) the RMSNorm of each head of ``head_dim``
    channels with ``norm_weight`` [head_dim] (or none), times ``silu(gate)`` ([M, K], any row
    stride; or no gate). Returns [M, sum N_g] in x's dtype."""
    M = x.shape[0]
    K = x.shape[1] // 2 if glu else x.shape[1]
    G = len(weights)
    if not (1 <= G <= MAX_GROUPS and 1 <= M <= MAX_ROWS) or x.dim() != 2:
        raise ValueError(f"grouped_gemv takes x [M, K] with 1..{MAX_ROWS} rows and 1..{MAX_GROUPS} weights, "
                         f"got x {tuple(x.shape)}, {G} weights")
    if glu and (norm_weight is not None or head_dim or silu):
        raise ValueError("grouped_gemv: glu does not combine with a norm or silu")
    if silu and head_dim:
        raise ValueError("grouped_gemv: silu combines with the whole-row norm only, not head_dim")
    if head_dim and (head_dim & (head_dim - 1) or K % head_dim):
        raise ValueError(f"head_dim must be a power of two dividing K = {K}, got {head_dim}")
    if gate is not None and (not head_dim or gate.shape != (M, K) or gate.stride(1) != 1):
        raise ValueError(f"gate must be [{M}, {K}] with unit column stride, with head_dim; got {tuple(gate.shape)}")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != K or w.dtype != x.dtype or not w.is_contiguous():
            raise ValueError(f"weights must be contiguous [N, {K}] in {x.dtype}; got {tuple(w.shape)} {w.dtype}")
    ns = [w.shape[0] for w in weights]
    NY = sum(ns)
    if norm_weight is not None and norm_weight.shape != ((head_dim or K),):
        raise ValueError(f"norm_weight must be [{head_dim or K}], got {tuple(norm_weight.shape)}")
    if residual is not None and residual.shape != (M, NY):
        raise ValueError(f"residual must be [{M}, {NY}], got {tuple(residual.shape)}")
    x = x.contiguous()
    y = torch.empty(M, NY, device=x.device, dtype=x.dtype)
    c = config(NY, K)
    BM = triton.next_power_of_2(M)
    # the accumulator holds BM * BN * BK fp32: at most the tuned one-row tile's 8192
    c["BK"] = max(16, min(c["BK"], triton.next_power_of_2(K), 8192 // (BM * c["BN"])))
    if head_dim:  # whole heads in every K block
        c["BK"] = max(c["BK"], head_dim)
        c["BN"] = max(1, min(c["BN"], 8192 // (BM * c["BK"])))
    ws = list(weights) + [weights[0]] * (MAX_GROUPS - G)
    ns_all = ns + [0] * (MAX_GROUPS - G)
    grid = (sum(triton.cdiv(n, c["BN"]) for n in ns),)
    nw = x if norm_weight is None else norm_weight.contiguous()
    res = x if residual is None else residual.contiguous()
    gt = x if gate is None else gate
    pdl = pdl_mode(x.device)
    _gemv_kernel[grid](x, y, *ws, *ns_all, nw, res, gt, gt.stride(0), M, K, x.shape[1], NY, eps, G=G, BM=BM,
                       NORM=norm_weight is not None and not head_dim, GLU=glu, RES=residual is not None,
                       HEAD=head_dim, HEAD_W=bool(head_dim) and norm_weight is not None,
                       GATE=gate is not None, SILU=silu, PDL=pdl, EARLY=bool(pdl) and EARLY, launch_pdl=pdl > 0, **c)
    return y
