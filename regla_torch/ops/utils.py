"""Shared pieces of the torch op paths: argument checks, varlen splitting, ``regla.layer_math``'s
namespace for torch tensors."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def check_inputs(q, k, v, g, initial_state, cu_seqlens):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape or (g is not None and g.shape != q.shape):
        raise ValueError(f"k and g must have q's shape {tuple(q.shape)}, got k {tuple(k.shape)}"
                         + ("" if g is None else f", g {tuple(g.shape)}"))
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {B}, {T}, {H}; got {tuple(v.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs a packed batch (B == 1), got B = {B}")
        # (values need a host sync: not inside a compiled block; the Triton op checks them there)
        if not torch.compiler.is_compiling() and (int(cu_seqlens[-1]) != T or int(cu_seqlens[0]) != 0):
            raise ValueError(f"cu_seqlens must run from 0 to T = {T}, got {cu_seqlens.tolist()}")
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (N, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [{N}, {H}, {K}, {v.shape[-1]}], "
                         f"got {tuple(initial_state.shape)}")


def over_segments(fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """Run a fixed-length op once per varlen segment (pure-torch paths only)."""
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, s = fn(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], scale, h0, True)
        outs.append(o)
        states.append(s)
    return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)


def segment_ids(cu_seqlens, T):
    """``[T]`` index of the packed sequence each position belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=T)


def use_triton(x: torch.Tensor) -> bool:
    """Whether the op dispatches to the Triton kernels: CUDA tensors with triton installed,
    unless ``REGLA_TRITON=0`` (the plain-torch path, for comparisons)."""
    if not x.is_cuda or os.environ.get("REGLA_TRITON", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _TorchOps:
    """``xp`` of ``regla.layer_math`` for torch tensors."""

    exp, expm1, log1p, logaddexp = torch.exp, torch.expm1, torch.log1p, torch.logaddexp
    sigmoid, where, log_sigmoid = torch.sigmoid, torch.where, F.logsigmoid
    silu, relu = staticmethod(F.silu), staticmethod(F.relu)  # Python functions: keep them unbound

    @staticmethod
    def maximum(x, c):
        return x.clamp(min=c)

    @staticmethod
    def minimum(x, c):
        return x.clamp(max=c)

    @staticmethod
    def amax(x, axis, keepdims):
        return x.amax(axis, keepdim=keepdims)

    @staticmethod
    def sum(x, axis, keepdims):
        return x.sum(axis, keepdim=keepdims)

    @staticmethod
    def cummax(x, axis):
        # along the last, contiguous axis: CUDA's scan over a middle axis runs one thread per
        # column ([B, T, H]: B*H threads, each T steps: 5.5 ms of a 350m ReGLA training step)
        return torch.cummax(x.movedim(axis, -1).contiguous(), -1).values.movedim(-1, axis)

    @staticmethod
    def concat(xs, axis):
        return torch.cat(xs, axis)

    @staticmethod
    def zeros(shape, like):
        return like.new_zeros(shape)

    @staticmethod
    def stop_gradient(x):
        return x.detach()

    @staticmethod
    def take(x, index, axis):
        return x.index_select(axis, index)

    @staticmethod
    def take_along_axis(x, index, axis):
        return x.gather(axis, index.expand(*index.shape[:-1], x.shape[-1]))

    @staticmethod
    def arange(n, like):
        return torch.arange(n, device=like.device)

    @staticmethod
    def to_f64(x):
        return x.double()

    @staticmethod
    def cast_like(x, like):
        return x.to(like.dtype)


TORCH = _TorchOps()
