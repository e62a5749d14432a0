"""Recurrent GLA for decode and short prefill: a torch loop, or one Triton kernel on CUDA (opt-in)."""

from __future__ import annotations

from .naive import naive_recurrent_gla
from .utils import check_inputs, over_segments, use_triton


def _torch_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state):
    return naive_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state)


def fused_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Same contract as ``chunk_gla``; cost O(T) sequential steps, O(1) memory per step."""
    check_inputs(q, k, v, g, initial_state, cu_seqlens)
    if use_triton(q):
        from .triton import fused_recurrent_gla as triton_recurrent_gla
        return triton_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None:
        return over_segments(_torch_recurrent_gla, q, k, v, g, scale, initial_state,
                             output_final_state, cu_seqlens)
    return _torch_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state)
