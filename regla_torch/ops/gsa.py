"""Gated Slot Attention (MATH.md section 4) as two gated linear-attention passes."""

from __future__ import annotations

import torch

from .chunk import chunk_gated, chunk_gla
from .fused_recurrent import fused_recurrent_gla
from .naive import naive_recurrent_gla
from .utils import segment_ids, use_triton


def chunk_gsa(q, k, v, s, g, scale=1.0, initial_state=None, output_final_state=False, chunked=True,
              cu_seqlens=None):
    """``q, k [B,T,H,K]``, ``v [B,T,H,V]``, slot weights ``s`` and log slot gates ``g [B,T,H,M]``.

    Pass one builds the slot keys (state ``[B,H,K,M]``, gated on the slot side) and scores the
    query against them; a softmax over slots turns the scores into the query of pass two,
    which reads the slot values (state ``[B,H,M,V]``, gated on the slot side, now the key side).
    ``chunked`` picks the chunked ops (training, long prefill) or the token-by-token ones
    (decode, short prefill). On CUDA pass two is the GLA Triton kernel (chunked or recurrent),
    and so is pass one token by token; chunked, pass one stays plain torch: a value-side gate
    has no chunked Triton kernel (fla writes one; see BENCHMARKS for what this costs). A single
    token (a decode step) takes the plain-torch recurrence in both passes: a few elementwise
    ops that torch.compile fuses into the compiled, CUDA-graph-captured decode step, where the
    Triton ops' autograd Functions would be traced through.
    ``cu_seqlens`` (B == 1, chunked, no states in or out: packed training rows) runs the packed
    sequences in one pass each, none seeing another.
    Returns ``(o, (hk, hv))``.
    """
    if cu_seqlens is not None:
        if not chunked or initial_state is not None or output_final_state:
            raise ValueError("chunk_gsa takes cu_seqlens only chunked, without states in or out "
                             "(run the sequences one by one for those)")
        scores, _ = chunk_gated(q, k, s, None, g, scale, segment_ids=segment_ids(cu_seqlens, q.shape[1]))
        p = torch.softmax(scores.float(), -1).to(s.dtype)
        o, _ = chunk_gla(p, s, v, g, 1.0, cu_seqlens=cu_seqlens)
        return o.to(q.dtype), None
    hk0, hv0 = (None, None) if initial_state is None else initial_state
    step = not chunked and q.shape[1] == 1
    if chunked:
        scores, hk = chunk_gated(q, k, s, None, g, scale, hk0, True)
    elif not step and use_triton(q):
        from .triton import fused_recurrent_gla_gv
        scores, hk = fused_recurrent_gla_gv(q, k, s, None, g, scale, hk0, True)
    else:
        scores, hk = naive_recurrent_gla(q, k, s, None, scale, hk0, True, gv=g)
    p = torch.softmax(scores.float(), -1)
    if step:
        o, hv = naive_recurrent_gla(p, s, v, g, 1.0, hv0, True)
    else:  # the kernels take one dtype for their q, k and v
        o, hv = (chunk_gla if chunked else fused_recurrent_gla)(p.to(s.dtype), s, v, g, 1.0, hv0, True)
    return o.to(q.dtype), ((hk, hv) if output_final_state else None)
