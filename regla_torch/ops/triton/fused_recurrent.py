"""Token-by-token GLA for decode and short prefill, and an in-place decode step.

One program holds a [K, BV] slice of the fp32 state in registers for the whole
sequence, so the state is read and written once. Optional value-side gate ``gv``
(per value channel) serves GSA's first pass (MATH.md section 4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Chunks, chunks, gdc_launch_dependents, gdc_wait, next_pow2, use_pdl


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
def _step_kernel(q, k, v, g, state, o, scale,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kc = tl.arange(0, BK)
    vc = i_v * BV + tl.arange(0, BV)
    mk = kc < K
    mv = vc < V
    m_kv = mk[:, None] & mv[None, :]
    p_s = state + i_bh * K * V + kc[:, None] * V + vc[None, :]
    # the state was last written by this kernel a step ago: complete before this launch even
    # under PDL (_common.PDL), so it loads before the wait for q, k, v, g
    b_h = tl.load(p_s, mask=m_kv, other=0.).to(tl.float32)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    b_q = tl.load(q + i_bh * K + kc, mask=mk, other=0.).to(tl.float32)
    b_k = tl.load(k + i_bh * K + kc, mask=mk, other=0.).to(tl.float32)
    b_g = tl.load(g + i_bh * K + kc, mask=mk, other=0.).to(tl.float32)
    b_v = tl.load(v + i_bh * V + vc, mask=mv, other=0.).to(tl.float32)
    b_h = b_h * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
    tl.store(p_s, b_h.to(state.dtype.element_ty), mask=m_kv)
    tl.store(o + i_bh * V + vc, (tl.sum(b_h * b_q[:, None], 0) * scale).to(o.dtype.element_ty),
             mask=mv)


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
    BV = min(BV, 32)  # decode is state-bandwidth bound: more, smaller programs
    pdl = use_pdl(q.device)
    _step_kernel[(triton.cdiv(V, BV), B * H)](q, k, v, g, state, out, scale, H=H, K=K, V=V,
                                             BK=BK, BV=BV, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out
