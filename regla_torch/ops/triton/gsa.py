"""Gated Slot Attention (MATH.md section 4) as two GLA passes linked by a softmax.

Pass one keeps K~^T, [K, M] per head: the slot gate acts on its value side, so it
runs on the token-by-token kernel with a value-side gate (no chunked value-gate
kernel yet). Pass two, [M, V] with the slot gate on the key side, is plain GLA.
"""
from __future__ import annotations

import torch

from .chunk import chunk_gla
from .fused_recurrent import fused_recurrent_gla, fused_recurrent_gla_gv


def _gsa(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens, second):
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    ok, hk = fused_recurrent_gla_gv(q, k, s, gk=None, gv=g, scale=scale, initial_state=hk0,
                                    output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens)
    p = torch.softmax(ok.float(), -1).to(q.dtype)
    o, hv = second(p, s, v, g, scale=1.0, initial_state=hv0,
                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return o, ((hk, hv) if output_final_state else None)


def fused_recurrent_gsa(q, k, v, s, g, scale=1.0, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """GSA, both passes token by token (decode, short prefill). q, k: [B,T,H,K];
    v: [B,T,H,V]; s, g: [B,T,H,M] (slot write weights and log slot gates);
    initial_state: (hk [N,H,K,M], hv [N,H,M,V]) or None. Returns (o, (hk, hv) or None).
    Differentiable."""
    return _gsa(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens,
                fused_recurrent_gla)


def chunk_gsa(q, k, v, s, g, scale=1.0, initial_state=None, output_final_state=False,
              cu_seqlens=None):
    """GSA with the second pass chunked; the first pass is token by token (see the
    module docstring), so this is not yet a fast training path. Differentiable."""
    return _gsa(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens, chunk_gla)
