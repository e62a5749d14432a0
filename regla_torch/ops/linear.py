"""Projections by several weights of one input: ``[F.linear(x, w) for w in weights]``.

At decode on CUDA (a few rows, no autograd), three or more weights run as one grouped
Triton GEMV (``regla_torch.ops.triton.grouped_gemv``): one launch instead of one cuBLAS call
each, three times faster for a layer's input projections. One or two weights stay with
cuBLAS, which reads a single big weight as fast as the grouped kernel (bench/bench_gemv.py).
Everywhere else they are plain ``F.linear``.
"""

import torch
import torch.nn.functional as F

from .utils import use_triton


def linear_many(x, weights):
    if (3 <= len(weights) <= 6 and not torch.is_grad_enabled() and use_triton(x) and x.numel() // x.shape[-1] <= 4
            and all(w.dtype == x.dtype and w.is_contiguous() for w in weights)):
        y = _grouped_gemv(x.reshape(-1, x.shape[-1]), list(weights))
        return [o.view(*x.shape[:-1], o.shape[-1]) for o in y.split([w.shape[0] for w in weights], -1)]
    return [F.linear(x, w) for w in weights]


# A registered op, so torch.compile keeps the launch as one opaque call in a compiled decode step.
@torch.library.custom_op("regla::grouped_gemv", mutates_args=())
def _grouped_gemv(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    from .triton import grouped_gemv

    return grouped_gemv(x, weights)


@_grouped_gemv.register_fake
def _(x, weights):
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))
