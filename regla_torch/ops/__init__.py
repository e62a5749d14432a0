"""GLA ops, ``[B, T, H, D]`` layout with a log-space per-key gate (MATH.md section 1).

``chunk_gla`` and ``fused_recurrent_gla`` run plain torch, or the Triton kernels
(``regla_torch.ops.triton``, same signature) for CUDA tensors; ``REGLA_TRITON=0`` keeps
CUDA on plain torch. ``decode_step_`` is the one-token step that updates a state in place;
``gated_decode_step_`` (CUDA) also computes a regla/gla layer's gate and key map on the way;
``gsa_decode_step_`` is GSA's step, its slot states in place.
"""

from .chunk import chunk_gated, chunk_gla
from .fused_recurrent import decode_step_, fused_recurrent_gla, gated_decode_step_
from .gsa import chunk_gsa, gsa_decode_step_
from .naive import naive_recurrent_gla

__all__ = ["chunk_gla", "fused_recurrent_gla", "decode_step_", "gated_decode_step_", "chunk_gsa",
           "gsa_decode_step_", "chunk_gated", "naive_recurrent_gla"]
