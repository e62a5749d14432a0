"""Token-by-token GLA recurrence in plain torch: the oracle the fast paths are tested against.

Also the path used for decode and short prefill off CUDA (a handful of tokens, where
a loop over T is cheaper than chunking).
"""

from __future__ import annotations

import torch


def naive_recurrent_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
                        gv=None):
    """``S_t = diag(exp(g_t)) S_{t-1} diag(exp(gv_t)) + k_t^T v_t``, ``o_t = scale * q_t S_t``.

    ``g`` gates key channels (GLA), ``gv`` value channels (GSA's first pass); either may be None.
    Computes in float32, returns ``o`` in q's dtype and the float32 state.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].float().exp()[..., None]
        if gv is not None:
            S = S * gv[:, t].float().exp()[..., None, :]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, V)
    return o.to(dtype), (S if output_final_state else None)


def recurrent_gla_reference(q, k, v, g, initial_state, do, dht, scale=None, cu_seqlens=None, every=64):
    """Float64 oracle with gradients: ``(o, final_state, dq, dk, dv, dg, d_initial_state)`` of the
    recurrence for the output gradient ``do`` and final-state gradient ``dht``.

    The gradients are written out by hand, backwards in time, so memory stays O(T / every)
    states (autograd through ``naive_recurrent_gla`` keeps one state per token, gigabytes at
    fla's test shapes): the states are kept every ``every`` tokens and rebuilt within a block.
    ``cu_seqlens`` (a list; B == 1) runs each segment from its own initial state.
    """
    x = [t.double() for t in (q, k, v, g, initial_state, do, dht)]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        return _reference_segment(*x, scale, every)
    bounds = [int(b) for b in cu_seqlens]
    parts = [_reference_segment(*(t[:, a:b] for t in x[:4]), x[4][n:n + 1], x[5][:, a:b], x[6][n:n + 1],
                                scale, every)
             for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return tuple(torch.cat([p[i] for p in parts], 0 if i in (1, 6) else 1) for i in range(7))


def _reference_segment(q, k, v, g, h0, do, dht, scale, every):
    T = q.shape[1]
    # [B, T, H, D] -> [T, B, H, D]: one contiguous slice per token
    q, k, v, g, do = (t.transpose(0, 1).contiguous() for t in (q, k, v, g, do))
    a = g.exp()
    S = h0.clone()
    o = torch.empty_like(v)
    saved = []
    step = lambda t, S: a[t, ..., None] * S + k[t, ..., None] * v[t, :, :, None, :]
    for t in range(T):
        if t % every == 0:
            saved.append(S)
        S = step(t, S)
        o[t] = scale * (q[t, :, :, None, :] @ S)[:, :, 0]
    final = S
    dq, dk, dv, dg = (torch.empty_like(t) for t in (q, k, v, g))
    dS = dht.clone()  # d loss / d S_t, all paths
    for c in reversed(range(len(saved))):
        t0, t1 = c * every, min(T, (c + 1) * every)
        states = [saved[c]]  # states[i] = S_{t0 + i - 1}
        for t in range(t0, t1):
            states.append(step(t, states[-1]))
        for t in reversed(range(t0, t1)):
            dq[t] = scale * (states[t - t0 + 1] @ do[t, ..., None])[..., 0]
            dS = dS + scale * q[t, ..., None] * do[t, :, :, None, :]
            dk[t] = (dS @ v[t, ..., None])[..., 0]
            dv[t] = (k[t, :, :, None, :] @ dS)[:, :, 0]
            dg[t] = a[t] * (states[t - t0] * dS).sum(-1)
            dS = a[t, ..., None] * dS
    back = lambda t: t.transpose(0, 1)
    return back(o), final, back(dq), back(dk), back(dv), back(dg), dS
