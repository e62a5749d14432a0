"""Triton kernels for GLA (and so for GSA's two passes) on NVIDIA GPUs (they also run on CPU tensors under
``TRITON_INTERPRET=1``, which is how CI tests them)."""
from .chunk import chunk_gla
from .fused_recurrent import (fused_recurrent_gated_step_, fused_recurrent_gla, fused_recurrent_gla_gv,
                              fused_recurrent_gla_step_, fused_recurrent_gsa_step_)
from .gemv import grouped_gemv

__all__ = ["chunk_gla", "fused_recurrent_gla", "fused_recurrent_gla_gv", "fused_recurrent_gla_step_",
           "fused_recurrent_gated_step_", "fused_recurrent_gsa_step_", "grouped_gemv"]
