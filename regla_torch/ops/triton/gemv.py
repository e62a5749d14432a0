"""Decode-time projections: several ``x @ W.T`` with one input and a few rows, one launch.

At batch 1 a decode step is matrix-vector products that read every weight once; cuBLAS
runs the small ones far under the memory bandwidth (five projections of a 1.3B layer,
25 MB: 50 us, 0.5 TB/s on the H200), mostly launch and ramp-up. This kernel reads up to
six weights of one input (q, k, v, the gates' first factors, the output gate) in one
launch, in row blocks spread over the whole GPU, fp32 accumulation: 16 us. For one or two
big weights cuBLAS is as fast or faster (bench/bench_gemv.py), so it keeps those.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_GROUPS = 6
MAX_ROWS = 4  # x rows (batch size at decode) the broadcast product handles well


# sizes stay runtime values: a size of 1 specialized to a constant would give one group's
# branch a different type than the others'
@triton.jit(do_not_specialize=["n0", "n1", "n2", "n3", "n4", "n5", "M", "K", "NY"])
def _gemv_kernel(x, y, w0, w1, w2, w3, w4, w5, n0, n1, n2, n3, n4, n5, M, K, NY,
                 G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[:, off_g + n] = x @ w_g[n].T for the row block this program owns; the groups' row
    blocks follow each other along the program axis, their outputs along y's columns."""
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
    # products accumulate elementwise and are reduced once at the end: the loop is only
    # loads and multiply-adds, so the next block's loads can issue while this one computes
    acc = tl.zeros([BM, BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        b_w = tl.load(w + rn[:, None].to(tl.int64) * K + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.)
        b_x = tl.load(x + rm[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.)
        acc += b_x.to(tl.float32)[:, None, :] * b_w.to(tl.float32)[None, :, :]
    tl.store(y + rm[:, None] * NY + col + rn[None, :], tl.sum(acc, 2).to(y.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


# Launch shape: rows of W per program, K block, warps, pipeline stages: the best of
# `bench/bench_gemv.py --tune` for a 1.3B model's five input projections on the H200.
CFG = dict(BN=16, BK=512, num_warps=8, num_stages=1)


def grouped_gemv(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat([x @ w.T for w in weights], -1)`` for x [M, K] with M <= 4 rows and up to
    six contiguous weights [N_g, K] of x's dtype. Returns [M, sum N_g] in x's dtype."""
    M, K = x.shape
    G = len(weights)
    if not (1 <= G <= MAX_GROUPS and 1 <= M <= MAX_ROWS):
        raise ValueError(f"grouped_gemv takes 1..{MAX_GROUPS} weights and 1..{MAX_ROWS} rows, got {G}, {M}")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != K or w.dtype != x.dtype or not w.is_contiguous():
            raise ValueError(f"weights must be contiguous [N, {K}] in {x.dtype}; got {tuple(w.shape)} {w.dtype}")
    x = x.contiguous()
    ns = [w.shape[0] for w in weights]
    NY = sum(ns)
    y = torch.empty(M, NY, device=x.device, dtype=x.dtype)
    c = dict(CFG)
    c["BK"] = min(c["BK"], max(16, triton.next_power_of_2(K)))
    ws = list(weights) + [weights[0]] * (MAX_GROUPS - G)
    ns_all = ns + [0] * (MAX_GROUPS - G)
    grid = (sum(triton.cdiv(n, c["BN"]) for n in ns),)
    _gemv_kernel[grid](x, y, *ws, *ns_all, M, K, NY, G=G, BM=triton.next_power_of_2(M), **c)
    return y
