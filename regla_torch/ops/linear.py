"""The model's projections, written so a decode step can fuse what sits around them.

- ``project(x, weights, norm)``: ``F.linear(norm(x), cat(weights))``, a block's input
  projections after its pre-norm;
- ``project_add(x, weight, residual, glu, pre)``: ``residual + F.linear(glu(pre(x)), weight)``, a
  block's output projection onto the residual stream (``pre``: ``HeadNormGate``, an attention
  layer's output norm and gate, or any callable);
- ``linear(x, weight, bias)``: ``F.linear``, for the gates' low-rank second factors.

At decode on CUDA (at most four rows, no autograd) the first two are one Triton GEMV launch
each (``regla_torch.ops.triton.grouped_gemv``) with the pre-norm, the attention output's
per-head norm and gate, the MLP's gating and the residual add inside it: one launch per
projection instead of one cuBLAS call per weight plus an elementwise kernel on each side
(bench/bench_gemv.py). Inside a compiled decode step,
``linear`` with a short inner dimension is a broadcast sum that torch.compile fuses into the
gate's elementwise kernel. Everywhere else all three are the plain torch they describe; under
autograd the norm and the gating are recomputed in the backward instead of kept (memory), and
on CUDA they run torch.compile'd (``fused``): the normed input goes straight to the matmul's
dtype, each piece one kernel each way.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .utils import use_triton


def _compiles(x) -> bool:
    """Whether a block (or a piece outside one) runs torch.compile'd: on CUDA under autograd
    (training), where each unfused cast, norm or gating is a pass over the [tokens, width]
    activations and its backward another, and each small op a launch from Python;
    ``REGLA_COMPILE=0`` keeps it eager (for comparisons, or where compiling fails)."""
    return x.is_cuda and torch.is_grad_enabled() and os.environ.get("REGLA_COMPILE", "1") != "0"


def fused(fn):
    """``fn``, run through ``torch.compile`` where ``_compiles`` says so (its first tensor
    argument decides): one kernel each way instead of one per elementwise op, as fla's fused
    norm and SwiGLU kernels are. Compiled once per process. Training compiles each block whole
    (``model._stateless_block``); the pieces inside it are traced inline, and compiled alone
    where a piece runs outside a block (the loss's final norm, the attention-transfer stage)."""
    compiled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        for x in args:  # a plain loop: traced without a graph break inside a compiled decode step
            if isinstance(x, torch.Tensor):
                break
        if _compiles(x) and not torch.compiler.is_compiling():  # inside a compiled block: inlined
            if not compiled:
                compiled.append(torch.compile(fn, dynamic=None))
            return compiled[0](*args, **kwargs)
        return fn(*args, **kwargs)
    return call


def _rms(x, weight, eps, dtype):
    return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).to(dtype)


_rms_norm = fused(_rms)


def rms_norm(x, weight, eps, dtype=None):
    """RMSNorm in float32, back in ``dtype`` (default x's; ``weight`` None: no affine weight)."""
    return _rms_norm(x, weight, eps, x.dtype if dtype is None else dtype)


def _matmul_dtype(x):
    """The dtype a matmul of x runs in: autocast's, where it is on, else x's."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class HeadNormGate:
    """``pre`` of a linear attention layer's o projection (``project_add``): the per-head norm
    of o ``[..., H, D]`` (an RMSNorm, a LayerNorm or None), flattened, times ``silu(gate)``
    ``[..., H * D]`` (or no gate). At decode an RMSNorm and the gate run inside the projection's
    GEMV."""

    def __init__(self, norm, gate):
        self.norm, self.gate = norm, gate

    def __call__(self, o):
        if isinstance(self.norm, RMSNorm):
            return _head_norm_gate(o, self.norm.weight, self.norm.eps, self.gate)
        return _gated(o if self.norm is None else self.norm(o), self.gate)

    def folds_into_gemv(self, o) -> bool:
        D = o.shape[-1]
        return (isinstance(self.norm, RMSNorm) and D & (D - 1) == 0
                and (self.gate is None or (self.gate.dtype == o.dtype and self.gate.stride(-1) == 1)))


class SiluNorm:
    """``pre`` of GSA's o projection: ``norm(silu(o))``, an RMSNorm over the whole row (None: no
    norm). At decode an RMSNorm with a weight runs inside the projection's GEMV."""

    def __init__(self, norm):
        self.norm = norm

    def __call__(self, o):
        o = F.silu(o)
        return o if self.norm is None else self.norm(o)

    def folds_into_gemv(self) -> bool:
        return isinstance(self.norm, RMSNorm) and self.norm.weight is not None


def _gemv_ok(x, weights):
    if torch.is_grad_enabled() or not use_triton(x):
        return False
    from .triton.gemv import MAX_GROUPS, MAX_ROWS

    return (x.numel() // x.shape[-1] <= MAX_ROWS and len(weights) <= MAX_GROUPS
            and all(w.dtype == x.dtype and w.is_contiguous() for w in weights))


def _gated(o, gate):
    """o [..., H, D] flattened to [..., H * D], times silu(gate) (None: no gate)."""
    o = o.flatten(-2)
    return o * F.silu(gate) if gate is not None else o


@fused
def _head_norm_gate(o, weight, eps, gate):
    return _gated(_rms(o, weight, eps, o.dtype), gate)


@fused
def _swiglu(x):
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


def project(x, weights, norm=None):
    """``F.linear(norm(x), torch.cat(weights))``: [..., sum of the weights' rows]. ``norm`` is
    an RMSNorm module (``weight``, ``eps``) or None."""
    if _gemv_ok(x, weights):
        y = _grouped_gemv(x.reshape(-1, x.shape[-1]), list(weights), None if norm is None else norm.weight,
                          1e-6 if norm is None else norm.eps, False, None)
        return y.view(*x.shape[:-1], y.shape[-1])
    if norm is not None and torch.is_grad_enabled():
        # training: keep x (which the norm's backward needs anyway), not norm(x) as well; the
        # norm is recomputed in the backward (one elementwise pass)
        return torch.utils.checkpoint.checkpoint(norm_linear, x, norm.weight, norm.eps, *weights,
                                                 use_reentrant=False)
    return norm_linear(x, None if norm is None else norm.weight, None if norm is None else norm.eps, *weights)


def norm_linear(x, norm_weight, eps, *weights):
    """``project`` without the decode GEMV nor the recomputation: for callers that checkpoint
    a larger piece themselves (the loss by blocks)."""
    if norm_weight is not None:
        # straight to the matmul's dtype: no separate cast of the normed copy under autocast
        x = rms_norm(x, norm_weight, eps, _matmul_dtype(x))
    if len(weights) == 1:
        return F.linear(x, weights[0])
    # stack whichever is smaller: the weights (one GEMM, for training and prefill) or the
    # outputs (decode, where copying every weight each step would cost more than the GEMMs)
    if x.numel() < weights[0].numel():
        return torch.cat([F.linear(x, w) for w in weights], -1)
    return F.linear(x, torch.cat(weights))


def project_add(x, weight, residual, glu=False, pre=None):
    """``residual + F.linear(pre(x), weight)``; with ``glu``, x is ``[gate | up]`` and the
    product is with ``silu(gate) * up``. ``pre`` (elementwise work before the projection: an
    attention layer's output norm and gate) defaults to the identity; at decode a
    ``HeadNormGate`` or ``SiluNorm`` with an RMSNorm runs inside the GEMV."""
    if torch.is_grad_enabled() and (glu or pre is not None):
        # training: keep x, not the normed, gated or silu(gate) * up tensors as well; they are
        # recomputed in the backward (as fla's fused norm-linear and SwiGLU-linear do)
        return residual + torch.utils.checkpoint.checkpoint(_prepared_linear, x, weight, glu, pre,
                                                            use_reentrant=False)
    if (isinstance(pre, HeadNormGate) and pre.folds_into_gemv(x) and _gemv_ok(x.flatten(-2), [weight])
            and residual.dtype == x.dtype):
        K = x.shape[-2] * x.shape[-1]
        rows = residual.reshape(-1, residual.shape[-1])
        gate = None if pre.gate is None else pre.gate.reshape(-1, K)
        y = _grouped_gemv(x.reshape(-1, K), [weight], pre.norm.weight, pre.norm.eps, False, rows, x.shape[-1],
                          gate)
        return y.view(residual.shape)
    if (isinstance(pre, SiluNorm) and pre.folds_into_gemv() and _gemv_ok(x, [weight])
            and residual.dtype == x.dtype):
        rows = residual.reshape(-1, residual.shape[-1])
        y = _grouped_gemv(x.reshape(-1, x.shape[-1]), [weight], pre.norm.weight, pre.norm.eps, False, rows,
                          silu=True)
        return y.view(residual.shape)
    if pre is not None:
        x = pre(x)
    if _gemv_ok(x, [weight]) and residual.dtype == x.dtype:
        rows = residual.reshape(-1, residual.shape[-1])
        y = _grouped_gemv(x.reshape(-1, x.shape[-1]), [weight], None, 1e-6, glu, rows)
        return y.view(residual.shape)
    return residual + _prepared_linear(x, weight, glu, None)


def _prepared_linear(x, weight, glu, pre):
    if pre is not None:
        x = pre(x)
    if glu:
        x = _swiglu(x)
    return F.linear(x, weight)


def linear(x, weight, bias=None):
    if (torch.compiler.is_compiling() and x.shape[-1] <= 64 and not torch.is_grad_enabled()
            and x.numel() // x.shape[-1] <= 4):
        y = (x.float().unsqueeze(-2) * weight.float()).sum(-1)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


# A registered op, so torch.compile keeps the launch as one opaque call in a compiled decode step.
@torch.library.custom_op("regla::grouped_gemv", mutates_args=())
def _grouped_gemv(x: torch.Tensor, weights: list[torch.Tensor], norm_weight: torch.Tensor | None, eps: float,
                  glu: bool, residual: torch.Tensor | None, head_dim: int = 0,
                  gate: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    from .triton import grouped_gemv

    return grouped_gemv(x, weights, norm_weight, eps, glu, residual, head_dim, gate, silu)


@_grouped_gemv.register_fake
def _(x, weights, norm_weight, eps, glu, residual, head_dim=0, gate=None, silu=False):
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))
