"""GLA ops, ``[B, T, H, D]`` layout with a log-space per-key gate (MATH.md section 1).

``chunk_gla`` and ``fused_recurrent_gla`` run plain torch, or the Triton kernels
(``regla_torch.ops.triton``, same signature) for CUDA tensors when ``REGLA_TRITON=1``:
opt-in until the kernels pass their GPU test suite.
"""

from .chunk import chunk_gated, chunk_gla
from .fused_recurrent import fused_recurrent_gla
from .gsa import chunk_gsa
from .naive import naive_recurrent_gla

__all__ = ["chunk_gla", "fused_recurrent_gla", "chunk_gsa", "chunk_gated", "naive_recurrent_gla"]
