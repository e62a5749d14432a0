"""Gated Slot Attention (MATH.md section 4) as two gated linear-attention passes."""

from __future__ import annotations

import torch

from regla import layer_math as lm

from .chunk import chunk_gated, chunk_gla
from .fused_recurrent import fused_recurrent_gla
from .naive import naive_recurrent_gla
from .utils import TORCH, segment_ids, use_triton


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
    token without a cache to update in place (a model's decode step runs ``gsa_decode_step_``)
    takes the plain-torch recurrence in both passes.
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


def gsa_decode_step_(q, k, v, f, scale, hk, hv, feature_map, gate_logit_normalizer):
    """One GSA decode step from the layer's projections, the slot states updated in place:
    the feature map of q and k, ``silu(v)``, the slot gate ``g = log_sigmoid(f) / normalizer``
    and weights ``s = 1 - exp(g)``, then ``chunk_gsa``'s two passes at one token:
    ``hk <- hk diag(a) + k s^T``, ``hv <- diag(a) hv + s v^T`` with ``a = exp(g)``; returns
    ``softmax(scale q hk) hv`` as [B, 1, H, V] in v's dtype.

    q: [B, 1, H, K]; k: [B, 1, HK, K], v: [B, 1, HK, V] and f: [B, 1, HK, M] for HK dividing H
    (each read by H / HK query heads); hk [B, H, K, M] and hv [B, H, M, V] float32, contiguous.
    On CUDA one Triton kernel (``fused_recurrent_gsa_step_``, which computes the elementwise
    feature maps itself); in place, so the compiled, CUDA-graph-captured decode step copies no
    state back. Inference only."""
    B, H, K, M = hk.shape
    V = hv.shape[-1]
    HK = k.shape[2] if k.dim() == 4 else 0
    if (q.shape != (B, 1, H, K) or HK < 1 or H % HK or k.shape != (B, 1, HK, K) or v.shape != (B, 1, HK, V)
            or f.shape != (B, 1, HK, M) or hv.shape != (B, H, M, V)):
        raise ValueError(f"gsa_decode_step_ needs q [{B}, 1, {H}, {K}], k, v, f [{B}, 1, HK, {K} / {V} / {M}] "
                         f"(HK dividing {H}) for states {tuple(hk.shape)}, {tuple(hv.shape)}; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, f {tuple(f.shape)}")
    if hk.dtype != torch.float32 or hv.dtype != torch.float32 or not (hk.is_contiguous() and hv.is_contiguous()):
        raise ValueError("gsa_decode_step_ updates float32 contiguous states in place; got hk "
                         f"{hk.dtype} (contiguous: {hk.is_contiguous()}), hv {hv.dtype} "
                         f"(contiguous: {hv.is_contiguous()})")
    return _gsa_step_op(q.contiguous(), k.contiguous(), v.contiguous(), f.contiguous(), hk, hv, float(scale),
                        feature_map, float(gate_logit_normalizer))


@torch.library.custom_op("regla::gsa_decode_step_", mutates_args=("hk", "hv"))
def _gsa_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, hk: torch.Tensor,
                 hv: torch.Tensor, scale: float, feature_map: str, gate_logit_normalizer: float) -> torch.Tensor:
    if use_triton(q):
        from .triton.fused_recurrent import GSA_STEP_MAPS, fused_recurrent_gsa_step_
        if feature_map not in GSA_STEP_MAPS:  # a map over the whole head (softmax): here, then none
            q, k = (lm.feature_map(TORCH, x, feature_map).to(x.dtype) for x in (q, k))
            feature_map = "identity"
        return fused_recurrent_gsa_step_(q, k, v, f, hk, hv, scale, feature_map, gate_logit_normalizer)
    G = q.shape[2] // k.shape[2]
    q, k = (lm.feature_map(TORCH, x[:, 0].float(), feature_map) for x in (q, k))
    g, s = lm.slot_gate(TORCH, f[:, 0].float(), gate_logit_normalizer)  # [B, HK, M]
    k, v, g, s = (x.repeat_interleave(G, 1) for x in (k, torch.nn.functional.silu(v[:, 0].float()), g, s))
    a = g.exp()
    hk.mul_(a[:, :, None, :]).add_(k[..., None] * s[:, :, None, :])
    hv.mul_(a[..., None]).add_(s[..., None] * v[:, :, None, :])
    p = torch.softmax(scale * torch.einsum("bhk,bhkm->bhm", q, hk), -1)
    return torch.einsum("bhm,bhmv->bhv", p, hv)[:, None].to(v.dtype)


@_gsa_step_op.register_fake
def _(q, k, v, f, hk, hv, scale, feature_map, gate_logit_normalizer):
    return v.new_empty(q.shape[0], 1, q.shape[2], v.shape[-1])
