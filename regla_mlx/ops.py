"""GLA ops for MLX, ``[B, T, H, D]`` layout with a log-space per-key gate (MATH.md section 1).

``chunk_gla`` and ``recurrent_gla`` run the Metal kernels of ``regla_mlx.kernels`` when
``mx.metal.is_available()`` and the pure-MLX paths below otherwise. Gradients always come
from the pure-MLX path (``mx.custom_function``), so fine-tuning works on either.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np


def _f32(x):
    return None if x is None else x.astype(mx.float32)


@functools.lru_cache(maxsize=None)
def _gate_sum_matrices(C: int):
    """0/1 matrices that pick, out of the C log gates of a chunk, the terms of every
    partial sum the chunked form needs: pairs ``sum_{j<s<=i}`` (rows i*C + j), prefixes
    ``sum_{s<=i}`` and suffixes ``sum_{s>j}``."""
    i = np.arange(C)
    pair = (i[None, None, :] > i[None, :, None]) & (i[None, None, :] <= i[:, None, None])  # [i, j, s]
    prefix = i[None, :] <= i[:, None]
    suffix = i[None, :] > i[:, None]
    return tuple(mx.array(m.reshape(-1, C).astype(np.float32)) for m in (pair, prefix, suffix))


def _gate_sums(g):
    """Partial sums of the log gates of each chunk, ``g [..., C, D]`` -> pair sums
    ``[..., C, C, D]`` (entry [i, j] = sum over j < s <= i, 0 for j >= i), prefix and suffix
    sums ``[..., C, D]``.

    Every sum is formed from its own terms (a product with a 0/1 matrix), never as the
    difference of two cumulative sums: after a log gate of -1e4 the cumulative sum is ~-1e4
    with an fp32 spacing of ~1e-3, so a difference of two of them is off by ~1e-3 in the
    exponent (issue #20). A sum of terms of one sign (g <= 0) is accurate relative to itself,
    so each factor exp(sum) is accurate to ~C ulp whatever the gates.
    """
    C, D = g.shape[-2:]
    pair, prefix, suffix = _gate_sum_matrices(C)
    pairs = (pair @ g).reshape(*g.shape[:-2], C, C, D)
    return pairs, prefix @ g, suffix @ g


def chunk_gated(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                chunk_size=16):
    """Chunked gated linear attention with key-side ``gk`` and/or value-side ``gv`` log gates.

    The exact form: the decay between positions j <= i of a chunk is ``exp(sum_{j<s<=i} g_s)``
    per channel, and every factor is the exp of a sum of gates (``_gate_sums``), so every
    exponent is <= 0 and accurate for any finite gate.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = q.dtype
    C = chunk_size
    pad = (-T) % C
    xs = [_f32(x) for x in (q, k, v, gk, gv)]
    if pad:  # zero keys and zero gates past the end: no state update, no decay
        xs = [None if x is None else mx.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in xs]
    q_, k_, v_, gk_, gv_ = [None if x is None else x.reshape(B, -1, C, H, x.shape[-1]).transpose(0, 1, 3, 2, 4)
                            for x in xs]  # [B, N, H, C, D]
    N = q_.shape[1]
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    neg_inf = mx.array(-mx.inf, dtype=mx.float32)
    if gk_ is not None:
        pk, bk, sk = _gate_sums(gk_)
        dk = mx.exp(mx.where(causal[..., None], pk, neg_inf))
        A = (q_[..., :, None, :] * k_[..., None, :, :] * dk).sum(-1)
        q_in, k_in = q_ * mx.exp(bk), k_ * mx.exp(sk)
    else:
        A = mx.where(causal, q_ @ k_.swapaxes(-1, -2), 0.0)
        q_in, k_in = q_, k_
    if gv_ is not None:
        pv, bv, sv = _gate_sums(gv_)
        dv = mx.exp(mx.where(causal[..., None], pv, neg_inf))
        intra = (A[..., None] * dv * v_[..., None, :, :]).sum(-2)
        v_in = v_ * mx.exp(sv)
    else:
        intra = A @ v_
        v_in = v_
    S = mx.zeros((B, H, K, V), mx.float32) if initial_state is None else initial_state.astype(mx.float32)
    inter = []
    for n in range(N):
        o_n = q_in[:, n] @ S
        if gv_ is not None:
            o_n = o_n * mx.exp(bv[:, n])
        inter.append(o_n)
        if gk_ is not None:
            S = S * mx.exp(bk[:, n, :, -1, :, None])
        if gv_ is not None:
            S = S * mx.exp(bv[:, n, :, -1, None, :])
        S = S + k_in[:, n].swapaxes(-1, -2) @ v_in[:, n]
    o = scale * (mx.stack(inter, 1) + intra)  # [B, N, H, C, V]
    o = o.transpose(0, 1, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]
    return o.astype(dtype), (S if output_final_state else None)


def recurrent_gated(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token form of ``chunk_gated``: the oracle, and decode off Metal."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = q.dtype
    q, k, v, gk, gv = (_f32(x) for x in (q, k, v, gk, gv))
    S = mx.zeros((B, H, K, V), mx.float32) if initial_state is None else initial_state.astype(mx.float32)
    outs = []
    for t in range(T):
        if gk is not None:
            S = S * mx.exp(gk[:, t])[..., None]
        if gv is not None:
            S = S * mx.exp(gv[:, t])[..., None, :]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ S)[..., 0, :])
    o = mx.stack(outs, 1) if outs else mx.zeros((B, 0, H, V), mx.float32)
    return o.astype(dtype), (S if output_final_state else None)


def _bounds(q, cu_seqlens):
    """Sequence bounds of a packed batch as a tuple of ints (None for a plain batch)."""
    if cu_seqlens is None:
        return None
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs a packed batch (B == 1), got B = {q.shape[0]}")
    b = tuple(int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, mx.array) else cu_seqlens))
    if len(b) < 2 or b[0] != 0 or b[-1] != q.shape[1] or any(y < x for x, y in zip(b, b[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {q.shape[1]}, got {list(b)}")
    return b


def _check(q, k, v, g, initial_state, bounds):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if tuple(k.shape) != tuple(q.shape) or tuple(g.shape) != tuple(q.shape):
        raise ValueError(f"k and g must have q's shape {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(g.shape)}")
    if tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"v must be [B, T, H, V] matching q's {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    B, _, H, K = q.shape
    N = B if bounds is None else len(bounds) - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [{N}, {H}, {K}, {v.shape[-1]}], got {tuple(initial_state.shape)}")


def _pure(kind, q, k, v, g, h0, scale, bounds):
    """The pure-MLX op: the Metal kernels' fallback and, always, their gradient."""
    fn = chunk_gated if kind == "chunk" else recurrent_gated
    if bounds is None:
        return fn(q, k, v, g, None, scale, h0, True)
    outs, states = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        o, s = fn(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], None, scale, h0[n:n + 1], True)
        outs.append(o)
        states.append(s)
    return mx.concatenate(outs, 1), mx.concatenate(states, 0)


def _gla(kind, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    bounds = _bounds(q, cu_seqlens)
    _check(q, k, v, g, initial_state, bounds)
    B, _, H, K = q.shape
    V = v.shape[-1]
    N = B if bounds is None else len(bounds) - 1
    scale = K ** -0.5 if scale is None else float(scale)
    h0 = mx.zeros((N, H, K, V), mx.float32) if initial_state is None else initial_state.astype(mx.float32)

    def pure(q, k, v, g, h0):
        return _pure(kind, q, k, v, g, h0, scale, bounds)

    # The Metal kernel's forward when there is one for these shapes and dtypes; the
    # gradient always comes from the pure path, so fine-tuning works on either.
    @mx.custom_function
    def op(q, k, v, g, h0):
        if mx.metal.is_available():
            from . import kernels

            if kernels.supported(K, V, q.dtype, k.dtype, v.dtype, g.dtype):
                return getattr(kernels, f"metal_{kind}_gla")(q, k, v, g, scale, h0, True, bounds)
        return pure(q, k, v, g, h0)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        _, vjps = mx.vjp(pure, list(primals), list(cotangents))
        return tuple(vjps)

    o, s = op(q, k, v, g, h0)
    return o, (s if output_final_state else None)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """GLA over a whole sequence, chunked: prefill and training. Returns ``(o, final_state)``.

    ``cu_seqlens`` (B == 1): bounds of packed sequences, each with its own state (one
    launch per kernel on Metal)."""
    return _gla("chunk", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """GLA token by token: decode and short prefill. Same contract as ``chunk_gla``."""
    return _gla("recurrent", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def chunk_gsa(q, k, v, s, g, scale=1.0, initial_state=None, output_final_state=False, chunked=True):
    """Gated slot attention (MATH.md section 4) as two gated passes linked by a softmax over slots.

    States: ``hk [B,H,K,M]`` (slot keys, gated on the slot side) and ``hv [B,H,M,V]``.
    """
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    fn = chunk_gated if chunked else recurrent_gated
    scores, hk = fn(q, k, s, None, g, scale, hk0, True)
    p = mx.softmax(scores.astype(mx.float32), axis=-1)
    o, hv = fn(p, s, v, g, None, 1.0, hv0, True)
    return o.astype(q.dtype), ((hk, hv) if output_final_state else None)
