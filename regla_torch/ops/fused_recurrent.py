"""Recurrent GLA for decode and short prefill: a torch loop, or one Triton kernel on CUDA."""

import torch

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


def decode_step_(q, k, v, g, state, scale=None):
    """One decode step that updates ``state`` in place: ``state <- diag(exp(g)) state + k^T v``;
    returns ``scale * q state`` as ``[B, 1, H, V]`` in v's dtype.

    q, k, g: [B, 1, H, K]; v: [B, 1, H, V]; state: [B, H, K, V] float32, contiguous. In place,
    so a decode loop allocates nothing per token (the condition for capturing the model's step
    in a CUDA graph). Not differentiable: for inference only.
    """
    B, H, K, V = state.shape
    if q.shape != (B, 1, H, K) or k.shape != q.shape or g.shape != q.shape or v.shape != (B, 1, H, V):
        raise ValueError(f"decode_step_ needs q, k, g [{B}, 1, {H}, {K}] and v [{B}, 1, {H}, {V}] for a state "
                         f"{tuple(state.shape)}; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"g {tuple(g.shape)}, v {tuple(v.shape)}")
    scale = K ** -0.5 if scale is None else float(scale)
    return _decode_step_op(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), state, scale)


# A registered op, so torch.compile keeps the in-place step as one opaque call inside a
# compiled decode step (GraphStep) instead of tracing through the Triton launch.
@torch.library.custom_op("regla::decode_step_", mutates_args=("state",))
def _decode_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor,
                    scale: float) -> torch.Tensor:
    if use_triton(q):
        from .triton import fused_recurrent_gla_step_
        return fused_recurrent_gla_step_(q, k, v, g, state, scale)
    state.mul_(g[:, 0].float().exp()[..., None])
    state.add_(k[:, 0].float()[..., None] * v[:, 0].float()[..., None, :])
    o = scale * (q[:, 0].float()[..., None] * state).sum(-2)
    return o[:, None].to(v.dtype)


@_decode_step_op.register_fake
def _(q, k, v, g, state, scale):
    return torch.empty_like(v)


def gated_decode_step_(q, k, v, r_f, w_f, b_f, state, scale, gate_logit_normalizer, clamp_min=None, r_r=None,
                       w_r=None, b_r=None, m=None):
    """``decode_step_`` of a regla/gla layer that also computes the layer's gate and key map
    from its projections (the Triton kernel ``fused_recurrent_gated_step_``: CUDA only, see
    its contract). One launch where the step took the gate's kernels and this one: the gate
    work cost a 1.3B ReGLA model five kernels a layer (BENCHMARKS section 1, decode).
    Returns o [B, 1, H, V]; ``state`` and the running max ``m`` [B, H] (contiguous float32,
    or None) are updated in place."""
    B, _, H, K = q.shape
    if m is not None and not m.is_contiguous():
        raise ValueError("m must be contiguous (it is updated in place)")
    return _gated_step_op(q.reshape(B, H, K).contiguous(), k.reshape(B, H, K).contiguous(),
                          v.reshape(B, H, -1).contiguous(), r_f.reshape(B, -1).contiguous(), w_f, b_f,
                          None if r_r is None else r_r.reshape(B, -1).contiguous(), w_r, b_r, m, state,
                          float(scale), float(gate_logit_normalizer), clamp_min)


@torch.library.custom_op("regla::gated_decode_step_", mutates_args=("state", "m"))
def _gated_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r_f: torch.Tensor, w_f: torch.Tensor,
                   b_f: torch.Tensor, r_r: torch.Tensor | None, w_r: torch.Tensor | None, b_r: torch.Tensor | None,
                   m: torch.Tensor | None, state: torch.Tensor, scale: float, gate_logit_normalizer: float,
                   clamp_min: float | None) -> torch.Tensor:
    from .triton import fused_recurrent_gated_step_
    return fused_recurrent_gated_step_(q, k, v, r_f, w_f, b_f, state, scale, gate_logit_normalizer,
                                       clamp_min, r_r, w_r, b_r, m)


@_gated_step_op.register_fake
def _(q, k, v, r_f, w_f, b_f, r_r, w_r, b_r, m, state, scale, gate_logit_normalizer, clamp_min):
    B, H, _ = q.shape
    return v.new_empty(B, 1, H, v.shape[-1])
