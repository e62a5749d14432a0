"""Chunked GLA (MATH.md section 1) in Triton: forward and backward.

Gates are cumsummed once per chunk of 64, in log2 units so every kernel uses exp2. Every
exponent a kernel evaluates is <= 0:
  * inter-chunk terms use b_i (cumsum from the chunk start) or b_last - b_j;
  * off-diagonal 16x16 blocks of the intra-chunk matrix factor exp(b_i - b_j) through
    a reference row r between j and i (r = first row of i's sub-chunk for the forward
    and dq, r = last row of j's sub-chunk for dv and dk): exp(b_i - r) * exp(r - b_j);
  * diagonal 16x16 blocks evaluate exp(b_i - b_j) element by element, masked (j <= i)
    before the exp.
So any finite log gate g <= 0 is safe, however strong. Chunks whose gates decay
little (see SPAN below) skip the sub-chunk split and use one reference row.

Exponents are differences of two cumsums, b_i - b_j. After a very strong gate (-1e4) b is
large (ulp ~1e-3 in fp32) while b_i - b_j of two later rows may be ~1e-3: an fp32 cumsum
would put an O(1) error on that factor. So the cumsum is formed exactly (see _prep_kernel)
and stored as hi + lo, two fp32 (hi = fp32(b), lo = b - hi), and the exact path evaluates every
difference as (hi_i - hi_j) + (lo_i - lo_j): hi_i - hi_j is exact (Sterbenz) whenever the
result is small against the operands, which is when the factor is not 0 anyway. lo is
stored, and loaded, only for the channels whose chunk decays past 2^-SPAN; below that
|b| <= SPAN < 128 and hi alone is within 2^-18 (a factor error < 2.7e-6). Chosen over forming
each partial sum directly (masked in-block cumsums) because it keeps the existing
reference-row structure and costs weak-gate chunks nothing: the fast path never reads lo.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import BC, BT, Chunks, chunks, dot_precision, next_pow2, state_dtype


@triton.jit
def _chunk_rows(cu, cidx, i_t, BT: tl.constexpr):
    """Chunk i_t of the flattened (sequence, chunk) list: its sequence's first and end rows
    and its own first row."""
    i_n = tl.load(cidx + 2 * i_t)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    return bos, eos, bos + tl.load(cidx + 2 * i_t + 1) * BT


@triton.jit
def _op(x, ref, F32OPS: tl.constexpr):
    """Operand of a fast-path dot: in the input dtype, or fp32 (a tf32 dot) where F32OPS: fp16
    inputs (their factors exp(r - b_j) may reach 2^SPAN, past fp16's range), and bf16 ones in
    the backward (see _bwd_intra)."""
    if F32OPS:
        return x.to(tl.float32)
    else:
        return x.to(ref.dtype)


@triton.jit
def _dot_hilo(a, b, PREC: tl.constexpr):
    """a @ b for an fp32 a and a b in the input dtype, a split as hi + lo in b's dtype: two
    tensor-core dots that keep ~2x the half format's mantissa of a (b is exact), where
    rounding a to fp16/bf16 first would put that format's error on every gradient term."""
    if b.dtype == tl.float32:
        return tl.dot(a, b, input_precision=PREC)
    else:
        a_hi = a.to(b.dtype)
        a_lo = (a - a_hi.to(tl.float32)).to(b.dtype)
        return tl.dot(a_lo, b, tl.dot(a_hi, b, input_precision=PREC), input_precision=PREC)


@triton.jit
def _two_sum(a, b):
    """a + b as the rounded sum and its rounding error, exactly (Knuth's two-sum)."""
    s = a + b
    bp = s - a
    return s, (a - (s - bp)) + (b - bp)


# ------------------------------------------------------------------ kernels
@triton.jit
def _prep_kernel(q, k, g, gc, gc_lo, kd, qg, cu, cidx,
                 H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 SPAN: tl.constexpr, STORE_QG: tl.constexpr):
    """Per chunk, in parallel: the gate cumsum in log2 units, as hi (gc) and lo (gc_lo, for
    channels past 2^-SPAN only), the keys decayed to the chunk's end (kd = k exp2(b_last - b))
    and, for the backward, the queries decayed from the chunk's start (qg = q exp2(b)). Every
    exponent is <= 0. The state scans then only load ready dot operands, which the compiler
    can prefetch a chunk ahead, and the cumsum is done once per chunk, not once per value
    block of the scan."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = _chunk_rows(cu, cidx, i_t, BT)
    rows = t0 + tl.arange(0, BT)
    kc = i_k * BK + tl.arange(0, BK)
    m = (rows < eos)[:, None] & (kc < K)[None, :]
    off = (rows[:, None] * H + i_h) * K + kc[None, :]
    last = tl.minimum(t0 + BT, eos) - 1
    # The cumsum b as hi + lo without fp64 or a compensated scan: the log2 gate x is split
    # as xh + xl with xh on a grid of 2^-9 and |xl| < 2^-9. x is first clamped to >= -256,
    # which changes no factor (exp2 of anything below -149 is 0 in fp32, and every exponent
    # that spans a gate includes it), so |cumsum(xh)| <= 64 * 256 = 2^14 on a 2^-9 grid: 23
    # bits, exact in fp32 whatever the order of the additions. cumsum(xl) is tiny (<= 2^-3)
    # and so accurate to ~2^-27. An error-free two-sum of the two gives hi = fp32(b) and lo.
    # The two-sum needs its additions unfused: the launcher compiles this kernel with fp
    # fusion off.
    b_x = tl.maximum(tl.load(g + off, mask=m, other=0.).to(tl.float32) * 1.4426950408889634, -256.)
    b_xh = (b_x * 512.).to(tl.int32).to(tl.float32) * (1. / 512.)
    b_sh = tl.cumsum(b_xh, axis=0)
    b_sl = tl.cumsum(b_x - b_xh, axis=0)
    b_hi, b_lo = _two_sum(b_sh, b_sl)
    is_last = (rows == last)[:, None]
    b_gl = tl.sum(tl.where(is_last, b_hi, 0.), 0)
    b_ll = tl.sum(tl.where(is_last, b_lo, 0.), 0)
    tl.store(gc + off, b_hi, mask=m)
    need = b_gl < -SPAN
    tl.store(gc_lo + off, b_lo, mask=m & need[None, :])
    b_k = tl.load(k + off, mask=m, other=0.)
    e_k = (b_gl[None, :] - b_hi) + (b_ll[None, :] - b_lo)
    tl.store(kd + off, (b_k * tl.exp2(e_k)).to(kd.dtype.element_ty), mask=m)
    if STORE_QG:
        b_q = tl.load(q + off, mask=m, other=0.)
        tl.store(qg + off, (b_q * tl.exp2(b_hi)).to(qg.dtype.element_ty), mask=m)


@triton.jit
def _span(gc, last, i_h, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """How far the chunk decays, max over channels of -b_last (log2): the fast path needs
    it <= SPAN, so that |b| <= SPAN on every row and hi alone is precise."""
    span_v = tl.zeros([BK], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        kc = i_k * BK + tl.arange(0, BK)
        span_v = tl.maximum(span_v, -tl.load(gc + (last * H + i_h) * K + kc, mask=kc < K, other=0.))
    return tl.max(span_v, 0)


@triton.jit
def _lo(gc_lo, off, m, need):
    """lo of the cumsum at off: stored only for the channels that need it (see the module
    docstring), so it is masked by need, which costs the other channels no traffic."""
    return tl.load(gc_lo + off, mask=m & need[None, :], other=0.)


@triton.jit
def _scan(x, y, gc, out, init, final, cu, coff, scale, i_k, i_v, i_nh,
          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
          USE_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    """One serial pass over the chunks of a segment, a [BK, BV] block of the state:
    s <- diag(exp2(b_last)) s + scale x^T y, storing the s met at every chunk before its
    update. In time order with (x, y) = (kd, v) that is the state entering each chunk; in
    reverse order with (qg, do), the gradient w.r.t. the state leaving it."""
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(coff + i_n).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    kc = i_k * BK + tl.arange(0, BK)
    vc = i_v * BV + tl.arange(0, BV)
    mk = kc < K
    mv = vc < V
    m_kv = mk[:, None] & mv[None, :]
    off_kv = kc[:, None] * V + vc[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INIT:
        b_s += tl.load(init + i_nh.to(tl.int64) * K * V + off_kv, mask=m_kv, other=0.).to(tl.float32)
    for j in range(NT):
        if REVERSE:
            i_c = NT - 1 - j
        else:
            i_c = j
        tl.store(out + ((c0 + i_c) * H + i_h) * K * V + off_kv, b_s.to(out.dtype.element_ty), mask=m_kv)
        t0 = bos + i_c * BT
        rows = t0 + tl.arange(0, BT)
        mr = rows < eos
        last = tl.minimum(t0 + BT, eos) - 1
        b_x = tl.load(x + (rows[None, :] * H + i_h) * K + kc[:, None], mask=mk[:, None] & mr[None, :], other=0.)
        b_y = tl.load(y + (rows[:, None] * H + i_h) * V + vc[None, :], mask=mr[:, None] & mv[None, :], other=0.)
        b_gl = tl.load(gc + (last * H + i_h) * K + kc, mask=mk, other=0.)
        b_s = b_s * tl.exp2(b_gl)[:, None] + scale * tl.dot(b_x, b_y, input_precision=PREC)
    if STORE_FINAL:
        tl.store(final + i_nh.to(tl.int64) * K * V + off_kv, b_s, mask=m_kv)


@triton.jit
def _fwd_h_kernel(kd, v, gc, h, h0, ht, cu, coff,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr):
    """h[chunk]: the state entering every chunk; optionally the final state."""
    _scan(kd, v, gc, h, h0, ht, cu, coff, 1.0, tl.program_id(0), tl.program_id(1), tl.program_id(2),
          H, K, V, BT, BK, BV, False, USE_H0, STORE_HT, PREC)


@triton.jit
def _bwd_scans_kernel(kd, v, qg, do, gc, h, dh, h0, dht, dh0, cu, coff, scale, NH,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      USE_H0: tl.constexpr, USE_DHT: tl.constexpr, PREC: tl.constexpr):
    """The backward's two independent serial passes in one launch: the first NH programs
    along axis 2 rebuild h (time order), the rest make dh (reverse order) and d(h0)."""
    i_k, i_v, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if i_p < NH:
        _scan(kd, v, gc, h, h0, dh0, cu, coff, 1.0, i_k, i_v, i_p,
              H, K, V, BT, BK, BV, False, USE_H0, False, PREC)
    else:
        _scan(qg, do, gc, dh, dht, dh0, cu, coff, scale, i_k, i_v, i_p - NH,
              H, K, V, BT, BK, BV, True, USE_DHT, USE_H0, PREC)


@triton.jit
def _fwd_o_kernel(q, k, v, gc, gc_lo, h, o, cu, cidx, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  PREC: tl.constexpr, SPAN: tl.constexpr, F32OPS: tl.constexpr):
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, t0 = _chunk_rows(cu, cidx, i_t, BT)
    NC: tl.constexpr = BT // BC
    vc = i_v * BV + tl.arange(0, BV)
    mv = vc < V
    ar_t = tl.arange(0, BT)
    ar_c = tl.arange(0, BC)
    rows_a = t0 + ar_t
    ma = rows_a < eos
    h_base = h + (i_t.to(tl.int64) * H + i_h) * K * V
    last = tl.minimum(t0 + BT, eos) - 1
    if _span(gc, last, i_h, H, K, BK) <= SPAN:
        acc = tl.zeros([BT, BV], dtype=tl.float32)
        a = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            kc = i_k * BK + tl.arange(0, BK)
            mk = kc < K
            m_a = ma[:, None] & mk[None, :]
            off_a = (rows_a[:, None] * H + i_h) * K + kc[None, :]
            b_q = tl.load(q + off_a, mask=m_a, other=0.)
            b_k = tl.load(k + off_a, mask=m_a, other=0.)
            b_g = tl.load(gc + off_a, mask=m_a, other=0.)
            b_0 = tl.load(gc + (t0 * H + i_h) * K + kc, mask=mk, other=0.)
            b_h = tl.load(h_base + kc[:, None] * V + vc[None, :],
                          mask=mk[:, None] & mv[None, :], other=0.)
            b_qg = b_q * tl.exp2(tl.where(m_a, b_g - b_0[None, :], 0.))
            b_kg = _op(b_k * tl.exp2(tl.where(m_a, b_0[None, :] - b_g, 0.)), b_q, F32OPS)
            a += tl.dot(_op(b_qg, b_q, F32OPS), tl.trans(b_kg), input_precision=PREC)
            acc += tl.dot((b_qg * tl.exp2(b_0)[None, :]).to(b_h.dtype), b_h, input_precision=PREC)
        a = tl.where(ar_t[:, None] >= ar_t[None, :], a, 0.)
        b_v = tl.load(v + (rows_a[:, None] * H + i_h) * V + vc[None, :],
                      mask=ma[:, None] & mv[None, :], other=0.)
        acc += tl.dot(a.to(b_v.dtype), b_v, input_precision=PREC)
        tl.store(o + (rows_a[:, None] * H + i_h) * V + vc[None, :],
                 (acc * scale).to(o.dtype.element_ty), mask=ma[:, None] & mv[None, :])
    else:
        for i_i in tl.static_range(NC):
            s0 = t0 + i_i * BC
            if s0 < eos:
                rows_i = s0 + ar_c
                mi = rows_i < eos
                acc = tl.zeros([BC, BV], dtype=tl.float32)
                a_off = tl.zeros([BC, BT], dtype=tl.float32)
                a_d = tl.zeros([BC, BC], dtype=tl.float32)
                for i_k in range(tl.cdiv(K, BK)):
                    kc = i_k * BK + tl.arange(0, BK)
                    mk = kc < K
                    m_i = mi[:, None] & mk[None, :]
                    off_i = (rows_i[:, None] * H + i_h) * K + kc[None, :]
                    need = tl.load(gc + (last * H + i_h) * K + kc, mask=mk, other=0.) < -SPAN
                    b_q = tl.load(q + off_i, mask=m_i, other=0.)
                    b_gq = tl.load(gc + off_i, mask=m_i, other=0.)
                    b_lq = _lo(gc_lo, off_i, m_i, need)
                    b_h = tl.load(h_base + kc[:, None] * V + vc[None, :],
                                  mask=mk[:, None] & mv[None, :], other=0.)
                    acc += tl.dot((b_q * tl.exp2(b_gq)).to(b_h.dtype), b_h, input_precision=PREC)
                    if i_i > 0:
                        b_r = tl.load(gc + (s0 * H + i_h) * K + kc, mask=mk, other=0.)
                        b_lr = tl.load(gc_lo + (s0 * H + i_h) * K + kc, mask=mk & need, other=0.)
                        m_a = ma[:, None] & mk[None, :]
                        off_a = (rows_a[:, None] * H + i_h) * K + kc[None, :]
                        b_k = tl.load(k + off_a, mask=m_a, other=0.)
                        b_gk = tl.load(gc + off_a, mask=m_a, other=0.)
                        b_lk = _lo(gc_lo, off_a, m_a, need)
                        e_k = tl.where((ar_t < i_i * BC)[:, None],
                                       (b_r[None, :] - b_gk) + (b_lr[None, :] - b_lk), float("-inf"))
                        b_kg = (b_k * tl.exp2(e_k)).to(b_q.dtype)
                        e_q = tl.where(m_i, (b_gq - b_r[None, :]) + (b_lq - b_lr[None, :]), 0.)
                        b_qg = (b_q * tl.exp2(e_q)).to(b_q.dtype)
                        a_off += tl.dot(b_qg, tl.trans(b_kg), input_precision=PREC)
                    b_kd = tl.load(k + off_i, mask=m_i, other=0.).to(tl.float32)
                    e_d = tl.where(((ar_c[:, None] >= ar_c[None, :]) & mi[:, None])[:, :, None],
                                   (b_gq[:, None, :] - b_gq[None, :, :]) + (b_lq[:, None, :] - b_lq[None, :, :]),
                                   float("-inf"))
                    a_d += tl.sum(b_q.to(tl.float32)[:, None, :] * b_kd[None, :, :] * tl.exp2(e_d), 2)
                b_vi = tl.load(v + (rows_i[:, None] * H + i_h) * V + vc[None, :],
                               mask=mi[:, None] & mv[None, :], other=0.)
                acc += tl.dot(a_d.to(b_vi.dtype), b_vi, input_precision=PREC)
                if i_i > 0:
                    b_va = tl.load(v + (rows_a[:, None] * H + i_h) * V + vc[None, :],
                                   mask=ma[:, None] & mv[None, :], other=0.)
                    acc += tl.dot(a_off.to(b_va.dtype), b_va, input_precision=PREC)
                tl.store(o + (rows_i[:, None] * H + i_h) * V + vc[None, :],
                         (acc * scale).to(o.dtype.element_ty), mask=mi[:, None] & mv[None, :])


@triton.jit
def _dv_part(q, k, gc, gc_lo, do, dh, dv, cu, cidx, scale, i_v, i_t, i_h,
             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
             BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             PREC: tl.constexpr, SPAN: tl.constexpr, F32OPS: tl.constexpr):
    """dv_j = scale * sum_{i>=j} A_ij do_i + (k_j exp(b_last - b_j)) @ dh."""
    bos, eos, t0 = _chunk_rows(cu, cidx, i_t, BT)
    NC: tl.constexpr = BT // BC
    vc = i_v * BV + tl.arange(0, BV)
    mv = vc < V
    ar_t = tl.arange(0, BT)
    ar_c = tl.arange(0, BC)
    rows_a = t0 + ar_t
    ma = rows_a < eos
    dh_base = dh + (i_t.to(tl.int64) * H + i_h) * K * V
    last = tl.minimum(t0 + BT, eos) - 1
    if _span(gc, last, i_h, H, K, BK) <= SPAN:
        acc = tl.zeros([BT, BV], dtype=tl.float32)
        at = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            kc = i_k * BK + tl.arange(0, BK)
            mk = kc < K
            m_a = ma[:, None] & mk[None, :]
            off_a = (rows_a[:, None] * H + i_h) * K + kc[None, :]
            b_q = tl.load(q + off_a, mask=m_a, other=0.)
            b_k = tl.load(k + off_a, mask=m_a, other=0.)
            b_g = tl.load(gc + off_a, mask=m_a, other=0.)
            b_0 = tl.load(gc + (t0 * H + i_h) * K + kc, mask=mk, other=0.)
            b_gl = tl.load(gc + (last * H + i_h) * K + kc, mask=mk, other=0.)
            b_dh = tl.load(dh_base + kc[:, None] * V + vc[None, :],
                           mask=mk[:, None] & mv[None, :], other=0.)
            b_qg = _op(b_q * tl.exp2(tl.where(m_a, b_g - b_0[None, :], 0.)), b_q, F32OPS)
            b_kg = _op(b_k * tl.exp2(tl.where(m_a, b_0[None, :] - b_g, 0.)), b_q, F32OPS)
            at += tl.dot(b_kg, tl.trans(b_qg), input_precision=PREC)
            acc += tl.dot((b_k * tl.exp2(b_gl[None, :] - b_g)).to(b_dh.dtype), b_dh,
                          input_precision=PREC)
        at = tl.where(ar_t[None, :] >= ar_t[:, None], at, 0.)
        b_do = tl.load(do + (rows_a[:, None] * H + i_h) * V + vc[None, :],
                       mask=ma[:, None] & mv[None, :], other=0.)
        acc += scale * _dot_hilo(at, b_do, PREC)
        tl.store(dv + (rows_a[:, None] * H + i_h) * V + vc[None, :],
                 acc.to(dv.dtype.element_ty), mask=ma[:, None] & mv[None, :])
    else:
        for i_j in tl.static_range(NC):
            s0 = t0 + i_j * BC
            if s0 < eos:
                rows_j = s0 + ar_c
                mj = rows_j < eos
                rlast = tl.minimum(s0 + BC, eos) - 1
                acc = tl.zeros([BC, BV], dtype=tl.float32)
                at_off = tl.zeros([BC, BT], dtype=tl.float32)
                at_d = tl.zeros([BC, BC], dtype=tl.float32)
                for i_k in range(tl.cdiv(K, BK)):
                    kc = i_k * BK + tl.arange(0, BK)
                    mk = kc < K
                    m_j = mj[:, None] & mk[None, :]
                    off_j = (rows_j[:, None] * H + i_h) * K + kc[None, :]
                    b_k = tl.load(k + off_j, mask=m_j, other=0.)
                    b_gl = tl.load(gc + (last * H + i_h) * K + kc, mask=mk, other=0.)
                    need = b_gl < -SPAN
                    b_ll = tl.load(gc_lo + (last * H + i_h) * K + kc, mask=mk & need, other=0.)
                    b_gk = tl.load(gc + off_j, mask=m_j, other=0.)
                    b_lk = _lo(gc_lo, off_j, m_j, need)
                    b_dh = tl.load(dh_base + kc[:, None] * V + vc[None, :],
                                   mask=mk[:, None] & mv[None, :], other=0.)
                    e_l = tl.where(m_j, (b_gl[None, :] - b_gk) + (b_ll[None, :] - b_lk), float("-inf"))
                    acc += tl.dot((b_k * tl.exp2(e_l)).to(b_dh.dtype), b_dh, input_precision=PREC)
                    if i_j < NC - 1:
                        b_r = tl.load(gc + (rlast * H + i_h) * K + kc, mask=mk, other=0.)
                        b_lr = tl.load(gc_lo + (rlast * H + i_h) * K + kc, mask=mk & need, other=0.)
                        m_a = ma[:, None] & mk[None, :]
                        off_a = (rows_a[:, None] * H + i_h) * K + kc[None, :]
                        b_q = tl.load(q + off_a, mask=m_a, other=0.)
                        b_gq = tl.load(gc + off_a, mask=m_a, other=0.)
                        b_lq = _lo(gc_lo, off_a, m_a, need)
                        e_q = tl.where((ar_t >= (i_j + 1) * BC)[:, None] & m_a,
                                       (b_gq - b_r[None, :]) + (b_lq - b_lr[None, :]), float("-inf"))
                        b_qg = b_q * tl.exp2(e_q)
                        e_k = tl.where(m_j, (b_r[None, :] - b_gk) + (b_lr[None, :] - b_lk), float("-inf"))
                        b_kg = b_k * tl.exp2(e_k)
                        at_off += tl.dot(b_kg, tl.trans(b_qg), input_precision=PREC)
                    b_qd = tl.load(q + off_j, mask=m_j, other=0.).to(tl.float32)
                    # [j, i, k]: exp(b_i - b_j) for i >= j
                    e_d = tl.where(((ar_c[None, :] >= ar_c[:, None]) & mj[None, :])[:, :, None],
                                   (b_gk[None, :, :] - b_gk[:, None, :]) + (b_lk[None, :, :] - b_lk[:, None, :]),
                                   float("-inf"))
                    at_d += tl.sum(b_k.to(tl.float32)[:, None, :] * b_qd[None, :, :] * tl.exp2(e_d), 2)
                b_doj = tl.load(do + (rows_j[:, None] * H + i_h) * V + vc[None, :],
                                mask=mj[:, None] & mv[None, :], other=0.)
                intra = _dot_hilo(at_d, b_doj, PREC)
                if i_j < NC - 1:
                    b_doa = tl.load(do + (rows_a[:, None] * H + i_h) * V + vc[None, :],
                                    mask=ma[:, None] & mv[None, :], other=0.)
                    intra += _dot_hilo(at_off, b_doa, PREC)
                acc += scale * intra
                tl.store(dv + (rows_j[:, None] * H + i_h) * V + vc[None, :],
                         acc.to(dv.dtype.element_ty), mask=mj[:, None] & mv[None, :])


@triton.jit
def _dqkg_part(q, k, v, gc, gc_lo, h, do, dh, dq, dk, dg, cu, cidx, scale, i_k, i_t, i_h,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               PREC: tl.constexpr, SPAN: tl.constexpr, F32OPS: tl.constexpr):
    """dq, dk and the gate gradient of one chunk, one block of key channels.

    With b the chunk cumsum, d/db_i = q_i dq_i - k_i dk_i everywhere, plus, at the
    chunk's last row, sum_v h_next * dh_next (the decay of the state carried out);
    dg is the reverse cumsum of that within the chunk.
    """
    bos, eos, t0 = _chunk_rows(cu, cidx, i_t, BT)
    last = tl.minimum(t0 + BT, eos) - 1
    NC: tl.constexpr = BT // BC
    kc = i_k * BK + tl.arange(0, BK)
    mk = kc < K
    ar_t = tl.arange(0, BT)
    ar_c = tl.arange(0, BC)
    rows_a = t0 + ar_t
    ma = rows_a < eos
    m_a = ma[:, None] & mk[None, :]
    off_a = (rows_a[:, None] * H + i_h) * K + kc[None, :]
    hb = (i_t.to(tl.int64) * H + i_h) * K * V
    b_gl = tl.load(gc + (last * H + i_h) * K + kc, mask=mk, other=0.)

    # The state carried out adds, per key channel, sum_v h_next dh_next to d/db_last, with
    # h_next = exp(b_last) h + sum_j k_j exp(b_last - b_j) v_j^T. Its second part is
    # sum_j k_j dk_j^inter, and the reverse cumsum of q dq - k dk takes that back off for the
    # rows at or after t: under strong gates dg_t is a small remainder of those two big sums,
    # so both must be formed from the same rounded values (a separately rounded rebuild of
    # h_next left dg 10% off in fp16). Hence dg_t = sum_{i>=t} (q_i dq_i - k_i dk^intra_i)
    # + sum_{i<t} k_i dk^inter_i + exp(b_last) sum_v h dh, from the dk^inter of this kernel.
    b_ka = tl.load(k + off_a, mask=m_a, other=0.)
    b_ga = tl.load(gc + off_a, mask=m_a, other=0.)
    # the path is chosen per block of key channels here: the blocks are independent
    if tl.max(-b_gl, 0) <= SPAN:
        # (the fast path keeps its earlier form: the one that shares dk^inter with dg, below,
        # made Triton 3.6 address shared memory out of range with bf16 states at BK 32 on the
        # H200 (compute-sanitizer); weak gates do not need it)
        b_0 = tl.load(gc + (t0 * H + i_h) * K + kc, mask=mk, other=0.)
        b_q0 = tl.load(q + off_a, mask=m_a, other=0.)
        b_kga = b_ka * tl.exp2(tl.where(m_a, b_gl[None, :] - b_ga, float("-inf")))
        carry = tl.zeros([BK], dtype=tl.float32)
        d_a = tl.zeros([BT, BT], dtype=tl.float32)
        d_qh = tl.zeros([BT, BK], dtype=tl.float32)
        d_ks = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            vc = i_v * BV + tl.arange(0, BV)
            mv = vc < V
            m_kv = mk[:, None] & mv[None, :]
            off_kv = kc[:, None] * V + vc[None, :]
            m_av = ma[:, None] & mv[None, :]
            b_h = tl.load(h + hb + off_kv, mask=m_kv, other=0.)
            b_dh = tl.load(dh + hb + off_kv, mask=m_kv, other=0.)
            b_va = tl.load(v + (rows_a[:, None] * H + i_h) * V + vc[None, :], mask=m_av, other=0.)
            b_doa = tl.load(do + (rows_a[:, None] * H + i_h) * V + vc[None, :], mask=m_av, other=0.)
            b_hn = b_h.to(tl.float32) * tl.exp2(b_gl)[:, None] + tl.dot(
                tl.trans(_op(b_kga, b_va, F32OPS)), _op(b_va, b_va, F32OPS), input_precision=PREC)
            carry += tl.sum(b_hn * b_dh.to(tl.float32), 1)
            d_a += tl.dot(b_doa, tl.trans(b_va), input_precision=PREC)
            d_qh += tl.dot(b_doa.to(b_h.dtype), tl.trans(b_h), input_precision=PREC)
            d_ks += tl.dot(b_va.to(b_dh.dtype), tl.trans(b_dh), input_precision=PREC)
        d_a = tl.where(ar_t[:, None] >= ar_t[None, :], d_a, 0.) * scale
        e_q = tl.exp2(tl.where(m_a, b_ga - b_0[None, :], 0.))
        e_k = tl.exp2(tl.where(m_a, b_0[None, :] - b_ga, 0.))
        b_qg = _op(b_q0 * e_q, b_q0, F32OPS)
        b_kg = _op(b_ka * e_k, b_q0, F32OPS)
        d_ao = _op(d_a, b_q0, F32OPS)
        b_dq = d_qh * tl.exp2(b_ga) * scale + e_q * tl.dot(d_ao, b_kg, input_precision=PREC)
        b_dk = e_k * tl.dot(tl.trans(d_ao), b_qg, input_precision=PREC) \
            + d_ks * tl.exp2(tl.where(m_a, b_gl[None, :] - b_ga, 0.))
        tl.store(dq + off_a, b_dq.to(dq.dtype.element_ty), mask=m_a)
        tl.store(dk + off_a, b_dk.to(dk.dtype.element_ty), mask=m_a)
        b_db = tl.where(m_a, b_q0.to(tl.float32) * b_dq - b_ka.to(tl.float32) * b_dk, 0.)
        b_dg = tl.cumsum(b_db, axis=0, reverse=True) + carry[None, :]
        tl.store(dg + off_a, b_dg.to(dg.dtype.element_ty), mask=m_a)
    else:
        # the same split, sub-chunk by sub-chunk from the last: the carry into a sub-chunk is
        # sum_{i<s0} k_i dk^inter_i + exp(b_last) sum_v h dh, i.e. the chunk's total minus the
        # sub-chunks done; the total's dk^inter comes from the same rounded operands (v, dh)
        # as the per-sub-chunk dk^inter below, so the two agree to fp32 rounding
        need = b_gl < -SPAN
        b_la = _lo(gc_lo, off_a, m_a, need)
        b_ll = tl.load(gc_lo + (last * H + i_h) * K + kc, mask=mk & need, other=0.)
        e_kl = tl.exp2(tl.where(m_a, (b_gl[None, :] - b_ga) + (b_ll[None, :] - b_la), float("-inf")))
        hdh = tl.zeros([BK], dtype=tl.float32)
        d_kse = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            vc = i_v * BV + tl.arange(0, BV)
            mv = vc < V
            m_kv = mk[:, None] & mv[None, :]
            off_kv = kc[:, None] * V + vc[None, :]
            b_h = tl.load(h + hb + off_kv, mask=m_kv, other=0.)
            b_dh = tl.load(dh + hb + off_kv, mask=m_kv, other=0.)
            b_va = tl.load(v + (rows_a[:, None] * H + i_h) * V + vc[None, :],
                           mask=ma[:, None] & mv[None, :], other=0.)
            hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
            d_kse += tl.dot(b_va.to(b_dh.dtype), tl.trans(b_dh), input_precision=PREC)
        kdk_rest = tl.sum(tl.where(m_a, b_ka.to(tl.float32) * d_kse * e_kl, 0.), 0)
        hdh = hdh * tl.exp2(b_gl)
        carry = tl.zeros([BK], dtype=tl.float32)

        for i_i in tl.static_range(NC - 1, -1, -1):
            s0 = t0 + i_i * BC
            if s0 < eos:
                rows_i = s0 + ar_c
                mi = rows_i < eos
                m_i = mi[:, None] & mk[None, :]
                off_i = (rows_i[:, None] * H + i_h) * K + kc[None, :]
                rlast = tl.minimum(s0 + BC, eos) - 1
                d_a = tl.zeros([BC, BT], dtype=tl.float32)    # dA[i in block, all j]
                d_at = tl.zeros([BC, BT], dtype=tl.float32)   # dA[all i, j in block]^T
                d_ad = tl.zeros([BC, BC], dtype=tl.float32)
                d_qh = tl.zeros([BC, BK], dtype=tl.float32)
                d_ks = tl.zeros([BC, BK], dtype=tl.float32)
                for i_v in range(tl.cdiv(V, BV)):
                    vc = i_v * BV + tl.arange(0, BV)
                    mv = vc < V
                    m_kv = mk[:, None] & mv[None, :]
                    off_kv = kc[:, None] * V + vc[None, :]
                    b_doi = tl.load(do + (rows_i[:, None] * H + i_h) * V + vc[None, :],
                                    mask=mi[:, None] & mv[None, :], other=0.)
                    b_vi = tl.load(v + (rows_i[:, None] * H + i_h) * V + vc[None, :],
                                   mask=mi[:, None] & mv[None, :], other=0.)
                    b_h = tl.load(h + hb + off_kv, mask=m_kv, other=0.)
                    b_dh = tl.load(dh + hb + off_kv, mask=m_kv, other=0.)
                    d_qh += tl.dot(b_doi.to(b_h.dtype), tl.trans(b_h), input_precision=PREC)
                    d_ks += tl.dot(b_vi.to(b_dh.dtype), tl.trans(b_dh), input_precision=PREC)
                    d_ad += tl.dot(b_doi, tl.trans(b_vi), input_precision=PREC)
                    if i_i > 0:
                        b_va = tl.load(v + (rows_a[:, None] * H + i_h) * V + vc[None, :],
                                       mask=ma[:, None] & mv[None, :], other=0.)
                        d_a += tl.dot(b_doi, tl.trans(b_va), input_precision=PREC)
                    if i_i < NC - 1:
                        b_doa = tl.load(do + (rows_a[:, None] * H + i_h) * V + vc[None, :],
                                        mask=ma[:, None] & mv[None, :], other=0.)
                        d_at += tl.dot(b_vi, tl.trans(b_doa), input_precision=PREC)
                b_qi = tl.load(q + off_i, mask=m_i, other=0.)
                b_ki = tl.load(k + off_i, mask=m_i, other=0.)
                b_gi = tl.load(gc + off_i, mask=m_i, other=0.)
                b_li = _lo(gc_lo, off_i, m_i, need)
                b_dq = d_qh * tl.exp2(b_gi)
                if i_i > 0:
                    b_r = tl.load(gc + (s0 * H + i_h) * K + kc, mask=mk, other=0.)
                    b_lr = tl.load(gc_lo + (s0 * H + i_h) * K + kc, mask=mk & need, other=0.)
                    e_k = tl.where((ar_t < i_i * BC)[:, None],
                                   (b_r[None, :] - b_ga) + (b_lr[None, :] - b_la), float("-inf"))
                    b_kg = b_ka * tl.exp2(e_k)
                    e_q = tl.where(m_i, (b_gi - b_r[None, :]) + (b_li - b_lr[None, :]), 0.)
                    b_dq += tl.exp2(e_q) * tl.dot(d_a, b_kg, input_precision=PREC)
                b_dk = tl.zeros([BC, BK], dtype=tl.float32)
                if i_i < NC - 1:
                    b_rp = tl.load(gc + (rlast * H + i_h) * K + kc, mask=mk, other=0.)
                    b_lp = tl.load(gc_lo + (rlast * H + i_h) * K + kc, mask=mk & need, other=0.)
                    b_qa = tl.load(q + off_a, mask=m_a, other=0.)
                    e_q = tl.where((ar_t >= (i_i + 1) * BC)[:, None] & m_a,
                                   (b_ga - b_rp[None, :]) + (b_la - b_lp[None, :]), float("-inf"))
                    b_qg = b_qa * tl.exp2(e_q)
                    e_k = tl.where(m_i, (b_rp[None, :] - b_gi) + (b_lp[None, :] - b_li), float("-inf"))
                    b_dk += tl.exp2(e_k) * tl.dot(d_at, b_qg, input_precision=PREC)
                # diagonal block, [i, j, k], exp(b_i - b_j) for j <= i
                e_d = tl.exp2(tl.where(((ar_c[:, None] >= ar_c[None, :]) & mi[:, None])[:, :, None],
                                       (b_gi[:, None, :] - b_gi[None, :, :]) + (b_li[:, None, :] - b_li[None, :, :]),
                                       float("-inf")))
                w = e_d * d_ad[:, :, None]
                b_dq += tl.sum(w * b_ki.to(tl.float32)[None, :, :], 1)
                b_dk += tl.sum(w * b_qi.to(tl.float32)[:, None, :], 0)
                b_dq = b_dq * scale
                b_dki = b_dk * scale
                b_dke = d_ks * tl.exp2(tl.where(m_i, (b_gl[None, :] - b_gi) + (b_ll[None, :] - b_li),
                                                float("-inf")))
                tl.store(dq + off_i, b_dq.to(dq.dtype.element_ty), mask=m_i)
                tl.store(dk + off_i, (b_dki + b_dke).to(dk.dtype.element_ty), mask=m_i)
                b_kf = b_ki.to(tl.float32)
                b_db = tl.where(m_i, b_qi.to(tl.float32) * b_dq - b_kf * b_dki, 0.)
                b_ke = tl.where(m_i, b_kf * b_dke, 0.)
                kdk_rest -= tl.sum(b_ke, 0)
                b_dg = tl.cumsum(b_db, axis=0, reverse=True) + (tl.cumsum(b_ke, axis=0) - b_ke) \
                    + (carry + kdk_rest + hdh)[None, :]
                carry += tl.sum(b_db, 0)
                tl.store(dg + off_i, b_dg.to(dg.dtype.element_ty), mask=m_i)


@triton.jit
def _bwd_intra_kernel(q, k, v, gc, gc_lo, h, do, dh, dq, dk, dv, dg, cu, cidx, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BC: tl.constexpr, NV_DV: tl.constexpr,
                      BK_DV: tl.constexpr, BV_DV: tl.constexpr, BK_QK: tl.constexpr, BV_QK: tl.constexpr,
                      PREC: tl.constexpr, SPAN: tl.constexpr, F32OPS: tl.constexpr):
    """dv, and dq, dk, dg, of every chunk in one launch (they need only h and dh): the first
    NV_DV programs along axis 0 are value blocks of dv, the rest key blocks of dq/dk/dg."""
    i_b, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if i_b < NV_DV:
        _dv_part(q, k, gc, gc_lo, do, dh, dv, cu, cidx, scale, i_b, i_t, i_h, H, K, V, BT, BC, BK_DV, BV_DV,
                 PREC, SPAN, F32OPS)
    else:
        _dqkg_part(q, k, v, gc, gc_lo, h, do, dh, dq, dk, dg, cu, cidx, scale, i_b - NV_DV, i_t, i_h, H, K, V, BT, BC,
                   BK_QK, BV_QK, PREC, SPAN, F32OPS)


# ------------------------------------------------------------------ launchers
# Fast path: when the gates of a chunk decay by at most 2^SPAN over the whole chunk
# (max over channels of -b_last, in log2 units, b counted from before the chunk's first
# gate) one reference row, the chunk's first, serves every pair:
# exp(b_i - b_j) = exp(b_i - b_0) * exp(b_0 - b_j) with the first factor <= 1 and the
# second <= 2^SPAN, so the intra-chunk matrices are plain 64x64 dots, and |b| <= SPAN so
# the cumsum's hi alone is precise. Why 96: ReGLA's gates at initialisation decay by about
# one bit per token (65 bits per chunk of 64 on the 350m preset), and a chunk that misses
# the fast path costs ReGLA's training step ~40%; 2^96 leaves a key (or its gradient) up to
# 2^30 before an fp32 or bf16 operand overflows, the masked (j > i) entries of the dots stay
# finite for |q| |k| K < 2^32, and hi alone keeps each factor within 2.7e-6 (fp32 error
# 5e-7..1.5e-6 against float64 at up to 1.4 bits per token: test_triton_gla's "regla"
# gates). fp16 operands are fp32 here (F32OPS; bf16 ones too in the backward). Stronger decays take the exact sub-chunk path, which also reads the cumsum's lo
# for the channels past 2^-SPAN. Tests set SPAN = -1 to force the exact path.
SPAN = 96.0

# Launch shapes per kernel: caps on the key/value blocks (clipped to the head dims),
# warps, pipeline stages. bench/bench_ops.py --tune times alternatives. The backward's intra
# kernel takes one stage: with two, Triton 3.6 pipelines its loop over value blocks, and on the
# H200 that raced whenever the loop ran twice or more (V > 64) on a loaded GPU: bf16 dq/dk/dg
# up to 0.22 off, a different row every run, right alone and under compute-sanitizer
# (bench/check_moving_error.py --intra-stages 2 brings it back; BENCHMARKS section 1).
CFG = {
    "scan": dict(BK=64, BV=64, num_warps=4, num_stages=3),
    "o": dict(BK=64, BV=128, num_warps=4, num_stages=2),
    "intra": dict(BK_DV=64, BV_DV=128, BK_QK=32, BV_QK=64, num_warps=4, num_stages=1),
}


@functools.lru_cache(maxsize=None)
def _cfg(name, K, V, scans=None):
    c = dict(CFG[name])
    for b, d in (("BK", K), ("BV", V), ("BK_DV", K), ("BV_DV", V), ("BK_QK", K), ("BV_QK", V)):
        if b in c:
            c[b] = min(c[b], max(16, next_pow2(d)))
    if name == "intra" and V <= c["BV_QK"]:
        # one value block: then the dq/dk/dg part takes the key channels in blocks of 64, even
        # when K < 64 (the rest masked). With blocks of 32, Triton 3.6 compiled a bf16 fast path
        # whose dk and dg are garbage on the H200: at K = V = 64 (rel. error ~1e3, every block,
        # any gates, plain or packed rows) and at K = 32, V = 64 (0.97, weak gates, plain rows);
        # right in the interpreter, in fp32, with two value blocks, and at BK 64
        # (bench/check_bf16_chunk.py, BENCHMARKS section 1)
        c["BK_QK"] = 64
    if scans is not None:
        # a scan runs one program per (segment, head, block) serially over the chunks; with
        # few segments and heads, narrower value blocks fill the GPU
        while c["BV"] > 16 and scans * triton.cdiv(K, c["BK"]) * triton.cdiv(V, c["BV"]) < 264:
            c["BV"] //= 2
    return c


def _prep(q, k, g, ch: Chunks, store_qg: bool):
    """The gate cumsum as (hi, lo), the keys decayed to the chunk's end and optionally the
    queries decayed from its start. lo is written only where the exact path reads it."""
    _, _, H, K = k.shape
    BK = min(64, max(16, next_pow2(K)))
    gc = torch.empty(g.shape, device=g.device, dtype=torch.float32)
    gc_lo = torch.empty_like(gc)
    kd = torch.empty_like(k)
    qg = torch.empty_like(q) if store_qg else None
    _prep_kernel[(triton.cdiv(K, BK), ch.NT, H)](q, k, g, gc, gc_lo, kd, qg, ch.cu, ch.cidx, H=H, K=K, BT=BT,
                                                 BK=BK, SPAN=SPAN, STORE_QG=store_qg, num_warps=4,
                                                 enable_fp_fusion=False)
    return (gc, gc_lo), kd, qg


def _fwd_h(kd, v, gcs, h0, ch: Chunks, store_ht: bool):
    _, _, H, K = kd.shape
    V = v.shape[-1]
    c = _cfg("scan", K, V, ch.N * H)
    h = torch.empty(ch.NT, H, K, V, device=kd.device, dtype=state_dtype(kd.dtype))
    ht = torch.empty(ch.N, H, K, V, device=kd.device, dtype=torch.float32) if store_ht else None
    _fwd_h_kernel[(triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"]), ch.N * H)](
        kd, v, gcs[0], h, h0, ht, ch.cu, ch.coff, H=H, K=K, V=V, BT=BT,
        USE_H0=h0 is not None, STORE_HT=store_ht, PREC=dot_precision(kd.dtype), **c)
    return h, ht


def _fwd_o(q, k, v, gcs, h, scale, ch: Chunks):
    _, _, H, K = q.shape
    V = v.shape[-1]
    c = _cfg("o", K, V)
    o = torch.empty_like(v)
    _fwd_o_kernel[(triton.cdiv(V, c["BV"]), ch.NT, H)](
        q, k, v, *gcs, h, o, ch.cu, ch.cidx, scale, H=H, K=K, V=V, BT=BT, BC=BC,
        PREC=dot_precision(q.dtype), SPAN=SPAN,
        F32OPS=q.dtype == torch.float16, **c)
    return o


def _bwd_scans(kd, v, qg, do, gcs, h0, dht, scale, ch: Chunks):
    """h (rebuilt) and dh, and d(initial state), from one launch."""
    _, _, H, K = kd.shape
    V = v.shape[-1]
    c = _cfg("scan", K, V, 2 * ch.N * H)
    h = torch.empty(ch.NT, H, K, V, device=kd.device, dtype=state_dtype(kd.dtype))
    dh = torch.empty_like(h)
    dh0 = torch.empty(ch.N, H, K, V, device=kd.device, dtype=torch.float32) if h0 is not None else None
    _bwd_scans_kernel[(triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"]), 2 * ch.N * H)](
        kd, v, qg, do, gcs[0], h, dh, h0, dht, dh0, ch.cu, ch.coff, scale, ch.N * H, H=H, K=K, V=V, BT=BT,
        USE_H0=h0 is not None, USE_DHT=dht is not None, PREC=dot_precision(kd.dtype), **c)
    return h, dh, dh0


def _bwd_intra(q, k, v, g, gcs, h, do, dh, scale, ch: Chunks):
    # bf16 too takes its fast-path dots' decayed operands (q, k scaled by their gate factors, dA,
    # and the keys that rebuild the state carried out of a chunk) in fp32, as tf32 dots: rounded
    # to bf16 they left dg 4-5x fla's error against the float64 recurrence (8e-3 against fla's
    # 1.7-2.1e-3, tests/test_fla_op_fixtures.py; dg is a small remainder of sums of q dq and k
    # dk); tf32 operands (emulated in the interpreter) give 2.2e-3
    _, _, H, K = q.shape
    V = v.shape[-1]
    c = _cfg("intra", K, V)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(do)
    dg = torch.empty(g.shape, device=g.device, dtype=g.dtype)
    nv = triton.cdiv(V, c["BV_DV"])
    _bwd_intra_kernel[(nv + triton.cdiv(K, c["BK_QK"]), ch.NT, H)](
        q, k, v, *gcs, h, do, dh, dq, dk, dv, dg, ch.cu, ch.cidx, scale, H=H, K=K, V=V, BT=BT, BC=BC, NV_DV=nv,
        PREC=dot_precision(q.dtype), SPAN=SPAN, F32OPS=q.dtype != torch.float32, **c)
    return dq, dk, dv, dg


def _bwd(q, k, v, g, h0, do, dht, scale, ch: Chunks):
    gcs, kd, qg = _prep(q, k, g, ch, store_qg=True)
    h, dh, dh0 = _bwd_scans(kd, v, qg, do, gcs, h0, dht, scale, ch)
    del kd, qg
    dq, dk, dv, dg = _bwd_intra(q, k, v, g, gcs, h, do, dh, scale, ch)
    return dq, dk, dv, dg, dh0


def _flat(x):
    B, T = x.shape[:2]
    return x.reshape(1, B * T, *x.shape[2:]).contiguous()


# The op is two registered torch ops (forward, backward) tied by register_autograd rather than
# an autograd.Function: torch.compile then keeps each as one opaque call inside a compiled
# training block (the chunk bookkeeping and launch logic stay out of the trace), so a whole
# block compiles to one graph each way. They take the flat [1, B*T, H, D] layout; ``B`` splits
# it into rows again. No final state / no initial state: an empty tensor (ops return tensors).
@torch.library.custom_op("regla::chunk_gla_fwd", mutates_args=())
def _chunk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, B: int, scale: float,
               h0: torch.Tensor | None, output_final_state: bool,
               cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    ch = chunks(B, q.shape[1] // B, q.device, cu_seqlens)
    gcs, kd, _ = _prep(q, k, g, ch, store_qg=False)
    h, ht = _fwd_h(kd, v, gcs, h0, ch, store_ht=output_final_state)
    del kd
    o = _fwd_o(q, k, v, gcs, h, scale, ch)
    return o, (ht if output_final_state else q.new_empty(0, dtype=torch.float32))


@_chunk_fwd.register_fake
def _(q, k, v, g, B, scale, h0, output_final_state, cu_seqlens):
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
    return torch.empty_like(v), (ht if output_final_state else q.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("regla::chunk_gla_bwd", mutates_args=())
def _chunk_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, B: int, scale: float,
               h0: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    ch = chunks(B, q.shape[1] // B, q.device, cu_seqlens)
    dq, dk, dv, dg, dh0 = _bwd(q, k, v, g, h0, do, dht, scale, ch)
    return dq, dk, dv, dg, (dh0 if dh0 is not None else q.new_empty(0, dtype=torch.float32))


@_chunk_bwd.register_fake
def _(q, k, v, g, B, scale, h0, do, dht, cu_seqlens):
    dh0 = torch.empty_like(h0) if h0 is not None else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), dh0


def _setup_context(ctx, inputs, output):
    q, k, v, g, B, scale, h0, output_final_state, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, g, h0, cu_seqlens)
    ctx.B, ctx.scale, ctx.output_final_state = B, scale, output_final_state


def _backward(ctx, do, dht):
    q, k, v, g, h0, cu_seqlens = ctx.saved_tensors
    dht = dht.float().contiguous() if ctx.output_final_state and dht is not None else None
    dq, dk, dv, dg, dh0 = _chunk_bwd(q, k, v, g, ctx.B, ctx.scale, h0, do.contiguous(), dht, cu_seqlens)
    return dq, dk, dv, dg, None, None, (dh0 if h0 is not None else None), None, None


_chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None):
    """Chunked GLA: ``o_t = scale * q_t S_t``, ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; g is the per-key-channel log gate (<= 0);
    initial_state: [N, H, K, V] (N = B, or the number of segments with ``cu_seqlens``).
    Returns ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.
    Differentiable in q, k, v, g and initial_state.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got {tuple(q.shape)}")
    if not (q.shape == k.shape == g.shape and v.shape[:3] == q.shape[:3]):
        raise ValueError("shapes must be q, k, g [B, T, H, K] and v [B, T, H, V]")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k and v must share a dtype")
    B, T = q.shape[:2]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0 = None
    if initial_state is not None:
        if initial_state.shape[0] != N:
            raise ValueError(f"initial_state has {initial_state.shape[0]} rows, expected {N}")
        h0 = initial_state.float().contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, ht = _chunk_fwd(_flat(q), _flat(k), _flat(v), _flat(g), B, scale, h0, bool(output_final_state),
                       cu_seqlens)
    return o.view(v.shape), (ht if output_final_state else None)
