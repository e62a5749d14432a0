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
