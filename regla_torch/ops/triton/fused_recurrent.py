"""Token-by-token GLA for decode and short prefill, and in-place decode steps.

One program holds a [K, BV] slice of the fp32 state in registers for the whole
sequence, so the state is read and written once. Optional value-side gate ``gv``
(per value channel) serves GSA's first pass (MATH.md section 4). The gated decode step
also computes a regla/gla layer's gate and key map itself (``fused_recurrent_gated_step_``);
GSA's decode step runs both of its passes in one kernel (``fused_recurrent_gsa_step_``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Chunks, chunks, next_pow2, pdl_mode, pdl_start, pdl_wait


@triton.jit
def _fused_recurrent_fwd_kernel(q, k, v, gk, gv, o, h0, ht, cu, scale,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr,
                                USE_GK: tl.constexpr, USE_GV: tl.constexpr,
                                USE_H0: tl.constexpr, STORE_HT: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    kc = tl.arange(0, BK)
    vc = i_v * BV + tl.arange(0, BV)
    mk = kc < K
    mv = vc < V
    m_kv = mk[:, None] & mv[None, :]
    off_kv = kc[:, None] * V + vc[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + off_kv, mask=m_kv, other=0.).to(tl.float32)
    for t in range(bos, eos):
        ok = (t * H + i_h) * K + kc
        ov = (t * H + i_h) * V + vc
        b_q = tl.load(q + ok, mask=mk, other=0.).to(tl.float32)
        b_k = tl.load(k + ok, mask=mk, other=0.).to(tl.float32)
        b_v = tl.load(v + ov, mask=mv, other=0.).to(tl.float32)
        if USE_GK:
            b_h = b_h * tl.exp(tl.load(gk + ok, mask=mk, other=0.).to(tl.float32))[:, None]
        if USE_GV:
            b_h = b_h * tl.exp(tl.load(gv + ov, mask=mv, other=0.).to(tl.float32))[None, :]
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale
        tl.store(o + ov, b_o.to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + off_kv, b_h, mask=m_kv)


@triton.jit
def _load_state(state, i_v, i_bh, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PDL: tl.constexpr):
    """A decode step's [K, BV] fp32 tile of a [K, V] state, then (under PDL) the wait for the
    kernel before."""
    pdl_start(PDL)
    kc = tl.arange(0, BK)
    vc = i_v * BV + tl.arange(0, BV)
    mk = kc < K
    mv = vc < V
    m_kv = mk[:, None] & mv[None, :]
    p_s = state + i_bh * K * V + kc[:, None] * V + vc[None, :]
    # the state was last written by a decode step a step ago: complete before this launch even
    # under PDL (_common.PDL), so it loads before the wait for the step's inputs
    b_h = tl.load(p_s, mask=m_kv, other=0.).to(tl.float32)
    pdl_wait(PDL)
    return kc, mk, vc, mv, m_kv, p_s, b_h


@triton.jit
def _update_state(state, p_s, b_h, m_kv, b_q, b_k, b_g, v, o, i_bh, vc, mv, scale, V: tl.constexpr):
    """``S <- diag(exp(g)) S + k^T v`` on the tile, stored in place; ``scale * q S`` to o."""
    b_v = tl.load(v + i_bh * V + vc, mask=mv, other=0.).to(tl.float32)
    b_h = b_h * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
    tl.store(p_s, b_h.to(state.dtype.element_ty), mask=m_kv)
    tl.store(o + i_bh * V + vc, (tl.sum(b_h * b_q[:, None], 0) * scale).to(o.dtype.element_ty),
             mask=mv)


@triton.jit
def _step_kernel(q, k, v, g, state, o, scale,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kc, mk, vc, mv, m_kv, p_s, b_h = _load_state(state, i_v, i_bh, K, V, BK, BV, PDL)
    b_q = tl.load(q + i_bh * K + kc, mask=mk, other=0.).to(tl.float32)
    b_k = tl.load(k + i_bh * K + kc, mask=mk, other=0.).to(tl.float32)
    b_g = tl.load(g + i_bh * K + kc, mask=mk, other=0.).to(tl.float32)
    _update_state(state, p_s, b_h, m_kv, b_q, b_k, b_g, v, o, i_bh, vc, mv, scale, V)


@triton.jit
def _log1p(x):
    # exact to a few ulp for x > -1 from exp/log alone (Goldberg): log(u) * x / (u - 1), u = 1 + x
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _expm1(x):
    # Kahan's: (u - 1) * x / log(u), u = exp(x); x itself where u rounds to 1
    u = tl.exp(x)
    d = tl.where(u == 1.0, 1.0, tl.log(u))
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * (x / d)))


@triton.jit
def _log_sigmoid(z):
    return tl.minimum(z, 0.) - _log1p(tl.exp(-tl.abs(z)))


@triton.jit
def _refined_log_gate(log_f, z_r):
    """layer_math.refined_log_gate (ReGLA's refining gate from the log forget gate and the
    refining projection z_r), each branch on its own side of -1; this kernel's and the
    persistent decode step's."""
    big = tl.maximum(log_f, -1.)
    one_minus_f = -_expm1(big)
    near_one = _log1p(-one_minus_f * (one_minus_f + 2. * tl.exp(big) * tl.sigmoid(-z_r)))
    small = tl.minimum(log_f, -1.)
    # f <= 1/e here, so far <= log(0.6) and the two logs below take arguments in [0.63, 2]: a
    # plain log's error (an ulp of 1) is an ulp or two of far; no need for _log1p's division
    other = 0.6931471805599453 + _log_sigmoid(z_r) + tl.log(1. - tl.exp(small))
    hi = tl.maximum(small, other)
    far = small + hi + tl.log(1. + tl.exp(-tl.abs(small - other)))
    return tl.where(log_f > -1., near_one, far)


@triton.jit
def _log_gate(z_f, z_r, inv_norm, clamp_min, REFINE: tl.constexpr, CLAMP: tl.constexpr):
    """layer_math.log_forget_gate from the gates' projections z_f (and ReGLA's refining z_r):
    logsigmoid over the normalizer, refined, clamped; this kernel's and the persistent decode
    step's."""
    g = _log_sigmoid(z_f) * inv_norm
    if REFINE:
        g = _refined_log_gate(g, z_r)
    if CLAMP:
        g = tl.maximum(g, clamp_min)
    return g


@triton.jit
def _safe_exp_maps(q, k, g, q_max, k_max, m_prev):
    """layer_math's safe-exp feature maps at one token, the keys' running max folded into the
    gate (MATH.md's causal form), from the maxima of q and k over the head: (q, k, g, new max)."""
    m_new = tl.maximum(m_prev, k_max)
    return tl.exp(q - q_max), tl.exp(k - m_new), g - (m_new - m_prev), m_new


@triton.jit
def _low_rank_weights(w, b, i_h, K: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """This head's rows of a low-rank gate's second factor w [H*K, R] and its bias b [H*K], fp32."""
    kc, rc = tl.arange(0, BK), tl.arange(0, BR)
    rows = i_h * K + kc
    b_w = tl.load(w + rows[:, None] * R + rc[None, :], mask=(kc < K)[:, None] & (rc < R)[None, :], other=0.)
    return b_w.to(tl.float32), tl.load(b + rows, mask=kc < K, other=0.).to(tl.float32)


@triton.jit
def _low_rank(r, b_w, b_b, i_b, R: tl.constexpr, BR: tl.constexpr):
    """``r[i_b] @ w.T + b`` for the rows ``_low_rank_weights`` loaded."""
    rc = tl.arange(0, BR)
    b_r = tl.load(r + i_b * R + rc, mask=rc < R, other=0.).to(tl.float32)
    return tl.sum(b_w * b_r[None, :], 1) + b_b


@triton.jit
def _gated_step_kernel(q, k, v, rf, wf, bf, rr, wr, br, m, done, state, o, scale, inv_norm, clamp_min,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, R: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr, REFINE: tl.constexpr,
                       SAFE_EXP: tl.constexpr, CLAMP: tl.constexpr, PDL: tl.constexpr):
    """_step_kernel with the layer's elementwise half in front (layer_math: ``log_forget_gate``,
    ``feature_map``, ``safe_exp_keys`` at one token): the gate from the low-rank projections'
    first factors r (the second factor and its bias here), refined and clamped; safe-exp maps
    of q and k with the running max folded into the gate. Every V block of a head recomputes
    the gate (K x R multiply-adds) and reads the old running max; the head's last block to
    count itself in ``done`` writes the new one over it, in place. Under PDL the gate weights
    and the running max (written a step ago, like the state) load before the wait too."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    b_wf, b_bf = _low_rank_weights(wf, bf, i_h, K, R, BK, BR)
    if REFINE:
        b_wr, b_br = _low_rank_weights(wr, br, i_h, K, R, BK, BR)
    if SAFE_EXP:
        m_prev = tl.load(m + i_bh).to(tl.float32)
    kc, mk, vc, mv, m_kv, p_s, b_h = _load_state(state, i_v, i_bh, K, V, BK, BV, PDL)
    z_f = _low_rank(rf, b_wf, b_bf, i_b, R, BR)
    z_r = z_f
    if REFINE:
        z_r = _low_rank(rr, b_wr, b_br, i_b, R, BR)
    b_g = _log_gate(z_f, z_r, inv_norm, clamp_min, REFINE, CLAMP)
    b_q = tl.load(q + i_bh * K + kc, mask=mk, other=0.).to(tl.float32)
    b_k = tl.load(k + i_bh * K + kc, mask=mk, other=0.).to(tl.float32)
    if SAFE_EXP:
        b_q, b_k, b_g, m_new = _safe_exp_maps(b_q, b_k, b_g, tl.max(tl.where(mk, b_q, float("-inf")), 0),
                                              tl.max(tl.where(mk, b_k, float("-inf")), 0), m_prev)
        b_k = tl.where(mk, b_k, 0.)
    _update_state(state, p_s, b_h, m_kv, b_q, b_k, b_g, v, o, i_bh, vc, mv, scale, V)
    if SAFE_EXP:
        # in place without a second buffer (and, in a CUDA graph, the copy back a step): the
        # atomic orders this block's read of m before it, so the block that counts last knows
        # every block of the head has read the old value; it resets the count for the next step.
        # After the state's update: the atomic's round trip overlaps the stores
        if tl.atomic_add(done + i_bh, 1) == tl.num_programs(0) - 1:
            tl.store(m + i_bh, m_new)
            tl.store(done + i_bh, 0)


# feature maps the GSA step computes itself (layer_math.feature_map's elementwise ones)
GSA_STEP_MAPS = {"identity": 0, "swish": 1, "relu": 2, "sigmoid": 3, "sqrelu": 4, "elu": 5}


@triton.jit
def _feature_map(x, MAP: tl.constexpr):
    if MAP == 1:
        x = x * tl.sigmoid(x)
    elif MAP == 2:
        x = tl.maximum(x, 0.)
    elif MAP == 3:
        x = tl.sigmoid(x)
    elif MAP == 4:
        x = tl.maximum(x, 0.) * tl.maximum(x, 0.)
    elif MAP == 5:
        x = tl.where(x > 0, x + 1., tl.exp(tl.minimum(x, 0.)))
    return x


@triton.jit
def _gsa_hk_tile(hk, q, k, b_a, b_s, i_bh, i_kv, k0, mc, mm, K: tl.constexpr, M: tl.constexpr, BK: tl.constexpr,
                 MAP: tl.constexpr):
    """Slot keys ``Kt <- Kt diag(a) + k s^T`` on rows k0..k0+BK, and those rows' share of q Kt."""
    kc = k0 + tl.arange(0, BK)
    mk = kc < K
    m_km = mk[:, None] & mm[None, :]
    p_hk = hk + i_bh * K * M + kc[:, None] * M + mc[None, :]
    b_hk = tl.load(p_hk, mask=m_km, other=0.).to(tl.float32)
    b_k = _feature_map(tl.load(k + i_kv * K + kc, mask=mk, other=0.).to(tl.float32), MAP)
    b_q = _feature_map(tl.load(q + i_bh * K + kc, mask=mk, other=0.).to(tl.float32), MAP)
    b_hk = b_hk * b_a[None, :] + b_k[:, None] * b_s[None, :]
    return b_hk, p_hk, m_km, tl.sum(b_q[:, None] * b_hk, 0)


@triton.jit
def _gsa_step_kernel(q, k, v, f, hk, hv, o, done, scale, inv_norm, H: tl.constexpr, HK: tl.constexpr,
                     K: tl.constexpr, M: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr, PDL: tl.constexpr):
    """A GSA decode step (MATH.md section 4) from the layer's projections, in place: the feature
    map of q and k, ``v <- silu(v)``, the slot gate ``g = log_sigmoid(f) / normalizer`` and
    weights ``s = 1 - exp(g)``; then slot keys Kt [K, M] and a [M, BV] tile of the slot values
    Vt, ``Kt <- Kt diag(a) + k s^T``, ``Vt <- diag(a) Vt + s v^T``, ``o = softmax(scale q Kt) Vt``
    with ``a = exp(g)``. k, v and f have HK heads, each read by H / HK query heads. Every V block
    of a head computes the whole softmax (Kt is K x M multiply-adds); the head's last block to
    count itself in ``done`` writes the new Kt over the old one."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_kv = (i_bh // H) * HK + (i_bh % H) // (H // HK)
    mc, mm, vc, mv, m_mv, p_hv, b_hv = _load_state(hv, i_v, i_bh, M, V, BM, BV, PDL)
    b_g = _log_sigmoid(tl.load(f + i_kv * M + mc, mask=mm, other=0.).to(tl.float32)) * inv_norm
    b_s = -_expm1(b_g)
    b_a = tl.exp(b_g)
    b_hk, p_hk, m_km, b_sc = _gsa_hk_tile(hk, q, k, b_a, b_s, i_bh, i_kv, 0, mc, mm, K, M, BK, MAP)
    for k0 in range(BK, K, BK):
        b_sc += _gsa_hk_tile(hk, q, k, b_a, b_s, i_bh, i_kv, k0, mc, mm, K, M, BK, MAP)[3]
    b_sc = tl.where(mm, b_sc * scale, float("-inf"))
    b_p = tl.exp(b_sc - tl.max(b_sc, 0))
    b_p = b_p / tl.sum(b_p, 0)
    b_v = tl.load(v + i_kv * V + vc, mask=mv, other=0.).to(tl.float32)
    b_v = b_v * tl.sigmoid(b_v)
    b_hv = b_hv * b_a[:, None] + b_s[:, None] * b_v[None, :]
    tl.store(p_hv, b_hv.to(hv.dtype.element_ty), mask=m_mv)
    tl.store(o + i_bh * V + vc, tl.sum(b_p[:, None] * b_hv, 0).to(o.dtype.element_ty), mask=mv)
    # as the gated step's running max: the atomic orders this block's reads of Kt before it
    if tl.atomic_add(done + i_bh, 1) == tl.num_programs(0) - 1:
        tl.store(p_hk, b_hk.to(hk.dtype.element_ty), mask=m_km)
        for k0 in range(BK, K, BK):  # (K wider than one tile: recomputed from the old rows)
            b_hk, p_hk, m_km, _ = _gsa_hk_tile(hk, q, k, b_a, b_s, i_bh, i_kv, k0, mc, mm, K, M, BK, MAP)
            tl.store(p_hk, b_hk.to(hk.dtype.element_ty), mask=m_km)
        tl.store(done + i_bh, 0)


@triton.jit
def _fr_bwd_dq_kernel(k, v, gk, gv, do, dq, h0, ht, cu, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr,
                      USE_GK: tl.constexpr, USE_GV: tl.constexpr, USE_H0: tl.constexpr):
    """Forward order: rebuild S_t (a key block, all value channels) and write
    dq_t = scale * S_t do_t and the final state."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    kc = i_k * BK + tl.arange(0, BK)
    vc = tl.arange(0, BV)
    mk = kc < K
    mv = vc < V
    m_kv = mk[:, None] & mv[None, :]
    off_kv = kc[:, None] * V + vc[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + off_kv, mask=m_kv, other=0.).to(tl.float32)
    for t in range(bos, eos):
        ok = (t * H + i_h) * K + kc
        ov = (t * H + i_h) * V + vc
        b_k = tl.load(k + ok, mask=mk, other=0.).to(tl.float32)
        b_v = tl.load(v + ov, mask=mv, other=0.).to(tl.float32)
        b_do = tl.load(do + ov, mask=mv, other=0.).to(tl.float32)
        if USE_GK:
            b_h = b_h * tl.exp(tl.load(gk + ok, mask=mk, other=0.).to(tl.float32))[:, None]
        if USE_GV:
            b_h = b_h * tl.exp(tl.load(gv + ov, mask=mv, other=0.).to(tl.float32))[None, :]
        b_h += b_k[:, None] * b_v[None, :]
        tl.store(dq + ok, tl.sum(b_h * b_do[None, :], 1) * scale, mask=mk)
    tl.store(ht + i_nh.to(tl.int64) * K * V + off_kv, b_h, mask=m_kv)


@triton.jit
def _fr_bwd_dkv_kernel(q, k, v, gk, gv, o, do, dq, ht, dht, dk, dv, dgk, dgv, dh0, cu, scale,
                       T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr,
                       USE_GK: tl.constexpr, USE_GV: tl.constexpr, USE_DHT: tl.constexpr,
                       STORE_DH0: tl.constexpr):
    """Reverse order over one [BK, BV] block of dS. dk (dv) is summed over value (key)
    blocks by the caller, and so are the gate gradients, accumulated here as reverse
    cumsums: dgk_t = sum_{s>=t} (q dq - k dk)_s + sum_v S_T dS_T, and
    dgv_t = sum_{s>=t} (o do - v dv)_s + sum_k S_T dS_T."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    kc = i_k * BK + tl.arange(0, BK)
    vc = i_v * BV + tl.arange(0, BV)
    mk = kc < K
    mv = vc < V
    m_kv = mk[:, None] & mv[None, :]
    off_kv = i_nh.to(tl.int64) * K * V + kc[:, None] * V + vc[None, :]
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_ds += tl.load(dht + off_kv, mask=m_kv, other=0.).to(tl.float32)
    b_st = tl.load(ht + off_kv, mask=m_kv, other=0.) * b_ds
    r_k = tl.sum(b_st, 1)
    r_v = tl.sum(b_st, 0)
    for j in range(0, eos - bos):
        t = eos - 1 - j
        ok = (t * H + i_h) * K + kc
        ov = (t * H + i_h) * V + vc
        b_q = tl.load(q + ok, mask=mk, other=0.).to(tl.float32)
        b_k = tl.load(k + ok, mask=mk, other=0.).to(tl.float32)
        b_v = tl.load(v + ov, mask=mv, other=0.).to(tl.float32)
        b_do = tl.load(do + ov, mask=mv, other=0.).to(tl.float32)
        b_ds += scale * b_q[:, None] * b_do[None, :]
        b_dk = tl.sum(b_ds * b_v[None, :], 1)
        b_dv = tl.sum(b_ds * b_k[:, None], 0)
        tl.store(dk + (i_v.to(tl.int64) * T + t) * H * K + i_h * K + kc, b_dk, mask=mk)
        tl.store(dv + (i_k.to(tl.int64) * T + t) * H * V + i_h * V + vc, b_dv, mask=mv)
        if USE_GK:
            r_k += -b_k * b_dk
            if i_v == 0:
                r_k += b_q * tl.load(dq + ok, mask=mk, other=0.)
            tl.store(dgk + (i_v.to(tl.int64) * T + t) * H * K + i_h * K + kc, r_k, mask=mk)
            b_ds = b_ds * tl.exp(tl.load(gk + ok, mask=mk, other=0.).to(tl.float32))[:, None]
        if USE_GV:
            r_v += -b_v * b_dv
            if i_k == 0:
                r_v += tl.load(o + ov, mask=mv, other=0.).to(tl.float32) * b_do
            tl.store(dgv + (i_k.to(tl.int64) * T + t) * H * V + i_h * V + vc, r_v, mask=mv)
            b_ds = b_ds * tl.exp(tl.load(gv + ov, mask=mv, other=0.).to(tl.float32))[None, :]
    if STORE_DH0:
        tl.store(dh0 + off_kv, b_ds, mask=m_kv)


def _bv(K, V):
    # the program keeps a [K, BV] fp32 tile in registers: 64 values a thread at 4 warps
    BK = next_pow2(K)
    return BK, max(16, min(next_pow2(V), 8192 // BK))


def _fused_recurrent_fwd(q, k, v, gk, gv, scale, h0, store_ht, ch: Chunks):
    _, _, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _bv(K, V)
    o = torch.empty_like(v)
    ht = torch.empty(ch.N, H, K, V, device=q.device, dtype=torch.float32) if store_ht else None
    _fused_recurrent_fwd_kernel[(triton.cdiv(V, BV), ch.N * H)](
        q, k, v, gk, gv, o, h0, ht, ch.cu, scale, H=H, K=K, V=V, BK=BK, BV=BV,
        USE_GK=gk is not None, USE_GV=gv is not None, USE_H0=h0 is not None,
        STORE_HT=store_ht, num_warps=4)
    return o, ht


def _flat(x):
    return None if x is None else x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


class FusedRecurrentGLAFunction(torch.autograd.Function):
    """Forward token by token; backward through the chunked kernels, which compute
    the gradient of the same function (the recurrence has no chunk size in it)."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        B, T = q.shape[:2]
        ch = chunks(B, T, q.device, cu_seqlens)
        qf, kf, vf, gf = map(_flat, (q, k, v, g))
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o, ht = _fused_recurrent_fwd(qf, kf, vf, gf, None, scale, h0, output_final_state, ch)
        ctx.save_for_backward(qf, kf, vf, gf, h0)
        ctx.ch, ctx.scale, ctx.shape = ch, scale, (B, T)
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return o.view(v.shape), ht

    @staticmethod
    def backward(ctx, do, dht):
        from .chunk import _bwd
        qf, kf, vf, gf, h0 = ctx.saved_tensors
        B, T = ctx.shape
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dg, dh0 = _bwd(qf, kf, vf, gf, h0, _flat(do), dht, ctx.scale, ctx.ch)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        sh = lambda x: x.view(B, T, *x.shape[2:])
        return sh(dq), sh(dk), sh(dv), sh(dg), None, dh0, None, None


def _check(q, k, v, g):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError("shapes must be q, k [B, T, H, K] and v [B, T, H, V]")
    if g is not None and g.shape != q.shape:
        raise ValueError("g must be [B, T, H, K] like q")


def fused_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Same function and signature as ``chunk_gla``, evaluated token by token (the fast
    path for decode and prefill of up to about 64 tokens). Differentiable: the
    backward runs the chunked backward kernels."""
    _check(q, k, v, g)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return FusedRecurrentGLAFunction.apply(q, k, v, g, scale, initial_state,
                                           bool(output_final_state), cu_seqlens)


class FusedRecurrentGVFunction(torch.autograd.Function):
    """Key- and/or value-side gates, token by token both ways. The backward rebuilds
    the states forward (for dq and the final state), then runs dS backward."""

    @staticmethod
    def forward(ctx, q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens):
        B, T = q.shape[:2]
        ch = chunks(B, T, q.device, cu_seqlens)
        qf, kf, vf, gkf, gvf = map(_flat, (q, k, v, gk, gv))
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o, ht = _fused_recurrent_fwd(qf, kf, vf, gkf, gvf, scale, h0, output_final_state, ch)
        ctx.save_for_backward(qf, kf, vf, gkf, gvf, o, h0)
        ctx.ch, ctx.scale, ctx.shape = ch, scale, (B, T)
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return o.view(v.shape), ht

    @staticmethod
    def backward(ctx, do, dht):
        qf, kf, vf, gkf, gvf, o, h0 = ctx.saved_tensors
        ch, scale = ctx.ch, ctx.scale
        B, T = ctx.shape
        _, TT, H, K = qf.shape
        V = vf.shape[-1]
        dof = _flat(do)
        dev = qf.device
        f32 = torch.float32
        BVf = next_pow2(V)
        BKq = max(1, min(next_pow2(K), 8192 // BVf))
        dq = torch.empty(1, TT, H, K, device=dev, dtype=f32)
        ht = torch.empty(ch.N, H, K, V, device=dev, dtype=f32)
        _fr_bwd_dq_kernel[(triton.cdiv(K, BKq), ch.N * H)](
            kf, vf, gkf, gvf, dof, dq, h0, ht, ch.cu, scale, H=H, K=K, V=V, BK=BKq, BV=BVf,
            USE_GK=gkf is not None, USE_GV=gvf is not None, USE_H0=h0 is not None, num_warps=4)
        BK, BV = min(64, next_pow2(K)), min(64, next_pow2(V))
        NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
        dk = torch.empty(NV, TT, H, K, device=dev, dtype=f32)
        dv = torch.empty(NK, TT, H, V, device=dev, dtype=f32)
        dgk = torch.empty(NV, TT, H, K, device=dev, dtype=f32) if gkf is not None else None
        dgv = torch.empty(NK, TT, H, V, device=dev, dtype=f32) if gvf is not None else None
        dh0 = torch.empty(ch.N, H, K, V, device=dev, dtype=f32) if h0 is not None else None
        dht = None if dht is None else dht.float().contiguous()
        _fr_bwd_dkv_kernel[(NK, NV, ch.N * H)](
            qf, kf, vf, gkf, gvf, o, dof, dq, ht, dht, dk, dv, dgk, dgv, dh0, ch.cu, scale,
            TT, H=H, K=K, V=V, BK=BK, BV=BV, USE_GK=gkf is not None, USE_GV=gvf is not None,
            USE_DHT=dht is not None, STORE_DH0=h0 is not None, num_warps=4)
        sh = lambda x, like: None if x is None else x.view(B, T, *x.shape[2:]).to(like.dtype)
        dgk = None if dgk is None else dgk.sum(0, keepdim=True)
        dgv = None if dgv is None else dgv.sum(0, keepdim=True)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return (sh(dq, qf), sh(dk.sum(0, keepdim=True), kf), sh(dv.sum(0, keepdim=True), vf),
                sh(dgk, gkf) if gkf is not None else None, sh(dgv, gvf) if gvf is not None else None,
                None, dh0, None, None)


def fused_recurrent_gla_gv(q, k, v, gk=None, gv=None, scale=None, initial_state=None,
                           output_final_state=False, cu_seqlens=None):
    """Recurrence with a key-side gate ``gk`` [B,T,H,K] and/or a value-side gate ``gv``
    [B,T,H,V]: ``S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t^T v_t``,
    ``o_t = scale * q_t S_t``. Differentiable (token-by-token backward); GSA's first
    pass uses ``gv``."""
    _check(q, k, v, gk)
    if gv is not None and gv.shape != v.shape:
        raise ValueError("gv must be [B, T, H, V] like v")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return FusedRecurrentGVFunction.apply(q, k, v, gk, gv, scale, initial_state,
                                          bool(output_final_state), cu_seqlens)


# V block of a decode step's programs: the step reads a state of K x V fp32 a head and little
# else, so more, smaller programs
STEP_BV = 32


def fused_recurrent_gla_step_(q, k, v, g, state, scale=None, out=None):
    """One decode step, in place: ``state <- diag(exp(g)) state + k^T v``, returns
    ``scale * q state``. q, k, g: [B, H, K] or [B, 1, H, K]; v: [B, H, V] (or with the
    length-1 axis); state: [B, H, K, V] contiguous (float32 advised), updated in place.
    Allocates only the output (none when ``out`` is given): safe to capture in a CUDA
    graph."""
    B, H, K, V = state.shape
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    for name, x, d in (("q", q, K), ("k", k, K), ("g", g, K), ("v", v, V)):
        if x.numel() != B * H * d or x.shape[-1] != d or not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous [B, H, {d}] or [B, 1, H, {d}]")
    scale = K ** -0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty(*v.shape, device=v.device, dtype=v.dtype)
    BK, BV = _bv(K, V)
    BV = min(BV, STEP_BV)
    pdl = pdl_mode(q.device)
    _step_kernel[(triton.cdiv(V, BV), B * H)](q, k, v, g, state, out, scale, H=H, K=K, V=V,
                                             BK=BK, BV=BV, PDL=pdl, num_warps=4, launch_pdl=pdl > 0)
    return out


def fused_recurrent_gated_step_(q, k, v, r_f, w_f, b_f, state, scale=None, gate_logit_normalizer=1.0,
                                clamp_min=None, r_r=None, w_r=None, b_r=None, m=None):
    """One decode step of a regla/gla layer from its projections, in place: the forget gate
    ``log_forget_gate(r_f @ w_f.T + b_f, r_r @ w_r.T + b_r)`` (refined when r_r is given,
    clamped at clamp_min when given), the safe-exp key map with running max ``m`` when m is
    given (the query's safe-exp map too; else both maps are the identity), then
    ``fused_recurrent_gla_step_``. Returns o [B, 1, H, V] in v's dtype; the state and the
    running max are updated in place.

    q, k: [B, H, K] or [B, 1, H, K]; v: [B, H, V] (or with the length-1 axis), contiguous;
    r_f, r_r: [B, R] the low-rank gate projections' first products; w_f, w_r: [H*K, R];
    b_f, b_r: [H*K]; m: [B, H] float32 contiguous; state: [B, H, K, V] contiguous."""
    B, H, K, V = state.shape
    R = w_f.shape[-1]
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    for name, x, d in (("q", q, K), ("k", k, K), ("v", v, V)):
        if x.numel() != B * H * d or x.shape[-1] != d or not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous [B, H, {d}] or [B, 1, H, {d}]")
    refine = r_r is not None
    for name, r, w, b in (("f", r_f, w_f, b_f),) + ((("r", r_r, w_r, b_r),) if refine else ()):
        if r.shape != (B, R) or w.shape != (H * K, R) or b.shape != (H * K,) or not (
                r.is_contiguous() and w.is_contiguous() and b.is_contiguous()):
            raise ValueError(f"gate {name}: r [{B}, {R}], w [{H * K}, {R}], b [{H * K}] contiguous; got "
                             f"{tuple(r.shape)}, {tuple(w.shape)}, {tuple(b.shape)}")
    if m is not None and (m.shape != (B, H) or m.dtype != torch.float32 or not m.is_contiguous()):
        raise ValueError(f"m must be a contiguous float32 [{B}, {H}], got {tuple(m.shape)} {m.dtype}")
    scale = K ** -0.5 if scale is None else float(scale)
    out = torch.empty(B, 1, H, V, device=v.device, dtype=v.dtype)
    BK, BV = _bv(K, V)
    BV = min(BV, STEP_BV)
    pdl = pdl_mode(q.device)
    _gated_step_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, r_f, w_f, b_f, r_r if refine else r_f, w_r if refine else w_f, b_r if refine else b_f,
        state if m is None else m, state if m is None else _counters(m.device, B * H), state, out, scale,
        1.0 / gate_logit_normalizer, 0.0 if clamp_min is None else float(clamp_min), H=H, K=K, V=V, R=R,
        BK=BK, BV=BV, BR=next_pow2(R), REFINE=refine, SAFE_EXP=m is not None, CLAMP=clamp_min is not None,
        PDL=pdl, num_warps=4, launch_pdl=pdl > 0)
    return out


def fused_recurrent_gsa_step_(q, k, v, f, hk, hv, scale, feature_map, gate_logit_normalizer):
    """One GSA decode step from the layer's projections, the slot states updated in place
    (``_gsa_step_kernel``): q [B, H, K] (or [B, 1, H, K]); k [B, HK, K], v [B, HK, V] and the
    slot gate logits f [B, HK, M] for HK dividing H, all contiguous, before the feature map (one
    of ``GSA_STEP_MAPS``), silu and log-sigmoid; hk [B, H, K, M] and hv [B, H, M, V] contiguous
    float32. Returns o [B, 1, H, V] in v's dtype. Allocates only o: safe to capture in a CUDA
    graph."""
    B, H, K, M = hk.shape
    V = hv.shape[-1]
    HK = k.numel() // (B * K)
    if hv.shape != (B, H, M, V) or not (hk.is_contiguous() and hv.is_contiguous()):
        raise ValueError(f"hk [B, H, K, M] and hv [B, H, M, V] must be contiguous; got {tuple(hk.shape)}, "
                         f"{tuple(hv.shape)}")
    if HK < 1 or H % HK:
        raise ValueError(f"k must have a number of heads dividing H = {H}, got {tuple(k.shape)}")
    for name, x, n, d in (("q", q, H, K), ("k", k, HK, K), ("v", v, HK, V), ("f", f, HK, M)):
        if x.numel() != B * n * d or x.shape[-1] != d or not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous [B, {n}, {d}] or [B, 1, {n}, {d}]")
    if feature_map not in GSA_STEP_MAPS:
        raise ValueError(f"the GSA step computes the feature maps {sorted(GSA_STEP_MAPS)}, not {feature_map!r}")
    out = torch.empty(B, 1, H, V, device=v.device, dtype=v.dtype)
    BM = next_pow2(M)
    # Kt's rows in tiles of at most 16K fp32 (64 a thread at 8 warps): one tile at fla's
    # shapes, so the last block writes Kt straight from registers
    BK = min(next_pow2(K), max(16, 16384 // BM))
    BV = min(next_pow2(V), max(16, 4096 // BM))
    pdl = pdl_mode(q.device)
    _gsa_step_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, f, hk, hv, out, _counters(hk.device, B * H), float(scale), 1.0 / gate_logit_normalizer,
        H=H, HK=HK, K=K, M=M, V=V, BK=BK, BM=BM, BV=BV, MAP=GSA_STEP_MAPS[feature_map], PDL=pdl,
        num_warps=8, launch_pdl=pdl > 0)
    return out


_COUNTERS: dict = {}


def _counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 [n] the step kernels' blocks count themselves in; every launch leaves it
    zeroed, so launches in one stream share it (two streams running this kernel at once would
    not). Made at the first step (GraphStep's warm-up runs before its capture) and never freed:
    a captured step keeps a valid address."""
    buf = _COUNTERS.get((device, n))
    if buf is None:
        buf = _COUNTERS[(device, n)] = torch.zeros(n, device=device, dtype=torch.int32)
    return buf
