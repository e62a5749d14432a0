"""Gated Slot Attention (MATH.md section 4) as two gated linear-attention passes."""

from __future__ import annotations

import torch

from .chunk import chunk_gated
from .naive import naive_recurrent_gla


def chunk_gsa(q, k, v, s, g, scale=1.0, initial_state=None, output_final_state=False, chunked=True):
    """``q, k [B,T,H,K]``, ``v [B,T,H,V]``, slot weights ``s`` and log slot gates ``g [B,T,H,M]``.

    Pass one builds the slot keys (state ``[B,H,K,M]``, gated on the slot side) and scores the
    query against them; a softmax over slots turns the scores into the query of pass two,
    which reads the slot values (state ``[B,H,M,V]``, gated on the slot side, now the key side).
    Returns ``(o, (hk, hv))``.
    """
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    if chunked:
        scores, hk = chunk_gated(q, k, s, None, g, scale, hk0, True)
    else:
        scores, hk = naive_recurrent_gla(q, k, s, None, scale, hk0, True, gv=g)
    p = torch.softmax(scores.float(), -1)
    if chunked:
        o, hv = chunk_gated(p, s, v, g, None, 1.0, hv0, True)
    else:
        o, hv = naive_recurrent_gla(p, s, v, g, 1.0, hv0, True)
    return o.to(q.dtype), ((hk, hv) if output_final_state else None)
