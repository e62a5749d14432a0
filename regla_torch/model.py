"""ReGLA / GLA / GSA decoders as transformers models (MATH.md sections 2-4).

One config class and one causal-LM class; ``attn_type`` picks the layer type of every
layer not listed in ``softmax_layers``. Weight names are fla's, so fla-hub ``gla`` and
``gsa`` state dicts load unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from regla import layer_math as lm
from regla.spec import GSA_OUTPUT_NORM_EPS, ModelArgs

from .ops import chunk_gla, chunk_gsa, decode_step_, fused_recurrent_gla, gated_decode_step_, gsa_decode_step_
from .ops.linear import HeadNormGate, RMSNorm, SiluNorm, fused, linear, norm_linear, project, project_add
from .ops.utils import TORCH, segment_ids, use_triton

# transformers renamed the output's cache field (past_key_values -> cache) in 5.x; use the
# name this version's generate() reads back.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# Below this many tokens the recurrent op beats chunking (decode, short prefill), as in fla.
RECURRENT_MAX_T = 64


class ReGLAConfig(PretrainedConfig):
    """transformers config carrying every field of ``regla.spec.ModelArgs``."""

    model_type = "regla"

    def __init__(self, **kwargs):
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in ModelArgs.__dataclass_fields__}
        # from_dict maps an fla model_type (gla/gsa) to attn_type, fills defaults, validates
        args = ModelArgs.from_dict({"model_type": kwargs.pop("model_type", "regla"), **own})
        for k, v in args.to_dict().items():
            if k != "model_type":
                setattr(self, k, v)
        super().__init__(bos_token_id=args.bos_token_id, eos_token_id=args.eos_token_id,
                         pad_token_id=args.pad_token_id, tie_word_embeddings=args.tie_word_embeddings,
                         **kwargs)

    @property
    def args(self) -> ModelArgs:
        return ModelArgs.from_dict({k: getattr(self, k) for k in ModelArgs.__dataclass_fields__})


class RecurrentCache:
    """Per-layer decode state. Linear layers keep a fixed-size state (``(S, m)`` for regla,
    ``(S, None)`` for gla, ``(hk, hv)`` for gsa); softmax layers keep their keys and values."""

    is_compileable = False

    def __init__(self, is_linear: list[bool]):
        self.states: list = [None] * len(is_linear)
        # transformers' generate() reads this to decide whether the cache grows with length
        self.is_linear = list(is_linear)
        self.seen_tokens = 0

    def __len__(self):
        return len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx):
        def pick(x):
            return None if x is None else x.index_select(0, beam_idx.to(x.device))
        self.states = [None if s is None else tuple(pick(x) for x in s) for s in self.states]


def low_rank(d_in, d_out, rank):
    """fla's gate projection: ``Linear(d, r) -> Linear(r, out, bias)``; rank 0 means full rank."""
    if rank == 0:
        return nn.Linear(d_in, d_out, bias=True)
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=True))


class ShortConvolution(nn.Module):
    """fla's ShortConvolution (depthwise causal conv over time + silu), same parameter names and
    shapes (``weight [width, 1, kernel]``, ``bias``); the arithmetic is ``layer_math.short_conv``."""

    def __init__(self, width, kernel, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, 1, kernel))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x, state=None, cu_seqlens=None, use_cache=False, mask=None):
        """``(silu(conv(x)), new state [N, kernel-1, width])``; with ``cu_seqlens`` (B == 1) no
        sequence sees another's inputs, and the states (in and out) are per sequence; ``mask``
        ([B,T], padded batches) keeps padded inputs out of every window and state."""
        if cu_seqlens is None:
            return lm.short_conv(TORCH, x, self.weight, self.bias, state, mask=mask)
        if state is None and not use_cache:  # packed training rows: one pass, masked at boundaries
            return lm.short_conv(TORCH, x, self.weight, self.bias, seg=segment_ids(cu_seqlens, x.shape[1]))[0], None
        parts = [lm.short_conv(TORCH, x[:, b:e], self.weight, self.bias, None if state is None else state[n:n + 1])
                 for n, (b, e) in enumerate(segments(cu_seqlens, x.shape[1]))]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0)


def head_norm(args: ModelArgs, width):
    """The per-head norm of a linear layer's output (MATH.md section 2, step 6), or None."""
    if args.attn_norm == "rmsnorm":
        return RMSNorm(width, args.norm_eps, args.elementwise_affine)
    if args.attn_norm == "layernorm":
        return nn.LayerNorm(width, eps=args.norm_eps, elementwise_affine=args.elementwise_affine)
    return None


class _Mixer(nn.Module):
    """What the linear layers share: q/k/v projections of the pre-normed input, optionally
    through fla's short convolutions."""

    def _init_qkv(self, args: ModelArgs):
        d, G = args.hidden_size, args.num_kv_groups
        widths = (args.key_dim, args.key_dim // G, args.value_dim // G)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, w, bias=False) for w in widths)
        if args.use_short_conv:
            self.q_conv1d, self.k_conv1d, self.v_conv1d = (ShortConvolution(w, args.conv_size, args.conv_bias)
                                                           for w in widths)

    def _convolve(self, q, k, v, states, cu_seqlens, use_cache, mask):
        """q, k, v through the short convolutions; returns them and the new conv states.
        Padded positions (``mask`` False) come out as zeros: they write nothing into the state."""
        conv = ()
        if self.args.use_short_conv:
            states = states or (None, None, None)
            out = [c(x, st, cu_seqlens, use_cache, mask)
                   for c, x, st in zip((self.q_conv1d, self.k_conv1d, self.v_conv1d), (q, k, v), states)]
            (q, _), (k, _), (v, _) = out
            conv = tuple(st for _, st in out)
        if mask is not None:
            q, k, v = (torch.where(mask[..., None], x, 0) for x in (q, k, v))
        return q, k, v, conv


def segments(cu_seqlens, T):
    if cu_seqlens is None:
        return [(0, T)]
    b = cu_seqlens.tolist()
    return list(zip(b[:-1], b[1:]))


def maps_and_gate(a: ModelArgs, q, k, z_f, z_r, m0=None, mask=None, seg=None, ends=None):
    """The elementwise half of a regla/gla layer: the forget gate from the gate projections'
    outputs (refined, clamped), the query and key feature maps and, for safe-exp, the running
    max folded into the gate. Returns ``(phi(q), phi(k), log gate g, running max or None)``;
    q and k keep their dtype (under autocast the projections' bf16, what the kernels take).
    ``mask`` (padded batch), ``seg``/``ends`` (packed rows): see ``layer_math.safe_exp_keys``."""
    g = lm.log_forget_gate(TORCH, z_f, z_r, a)
    if mask is not None:  # no decay at padded positions
        g = torch.where(mask[..., None, None], g, 0.0)
    q_out = lm.feature_map(TORCH, q, a.feature_map).to(q.dtype)
    m_last = None
    if a.feature_map == "safe_exp":
        phi, term, m_last = lm.safe_exp_keys(TORCH, k.float(), m0, seg, ends, mask)
        # phi lies in (0, 1]: the projections' bf16 holds it well
        return q_out, phi.to(q.dtype), g + term[..., None], m_last
    k = lm.feature_map(TORCH, k, a.feature_map)
    if mask is not None:  # maps with phi(0) != 0 (elu, sigmoid) must not write either
        k = torch.where(mask[..., None, None], k, 0)
    return q_out, k.to(q.dtype), g, m_last


# Training on CUDA runs it compiled: about a dozen fp32 elementwise passes over [B,T,H,K]
# (log-sigmoid, refining gate, clamp, feature maps, running max term) become a few fused kernels,
# and the backward recomputes them instead of keeping every intermediate (PROFILE-H200: ReGLA's
# unfused gate work cost ~40 ms and 11 GiB a step at 350M).
_fused_maps_and_gate = fused(maps_and_gate)


class LinearAttention(_Mixer):
    """A regla or gla layer: gated linear attention with the chosen feature map and gate.

    Its state is ``(S, m)`` (m, the keys' running max, is None unless the map is safe-exp),
    followed by the short convolutions' states when the config has them."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.args, self.layer_idx = args, layer_idx
        d, G = args.hidden_size, args.num_kv_groups
        self._init_qkv(args)
        self.gk_proj = low_rank(d, args.key_dim // G, args.gate_low_rank_dim)
        if args.use_refining_gate:
            self.gr_proj = low_rank(d, args.key_dim // G, args.gate_low_rank_dim)
        if args.use_output_gate:
            self.g_proj = nn.Linear(d, args.value_dim, bias=False)
        norm = head_norm(args, args.head_v_dim)
        if norm is not None:
            setattr(self, args.norm_name, norm)
        self.o_proj = nn.Linear(args.value_dim, d, bias=False)

    def forward(self, h, norm, state=None, cu_seqlens=None, use_cache=False, pad=None):
        a = self.args
        B, T, _ = h.shape
        Kd, Vd, G = a.head_k_dim, a.head_v_dim, a.num_kv_groups
        mask = None if pad is None else pad[:, -T:]  # padded batch: False at padding
        # every projection of norm(h) in one call (one launch at decode); biases come after
        gates = [self.gk_proj] + ([self.gr_proj] if a.use_refining_gate else [])
        low = a.gate_low_rank_dim > 0
        ws = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        ws += [m[0].weight if low else m.weight for m in gates]
        ws += [self.g_proj.weight] if a.use_output_gate else []
        q, k, v, *rest = project(h, ws, norm).split([w.shape[0] for w in ws], -1)
        S0, m0, *conv0 = (None, None) if state is None else state
        q, k, v, conv = self._convolve(q, k, v, conv0, cu_seqlens, use_cache, mask)
        q, k, v = q.view(B, T, -1, Kd), k.view(B, T, -1, Kd), v.view(B, T, -1, Vd)
        out_gate = rest[-1] if a.use_output_gate else None
        decode = T == 1 and S0 is not None and use_cache and not torch.is_grad_enabled()
        if decode and self._gated_step_ok(q, m0, mask):
            # the gate's second factor, refinement, clamp and key map inside the step kernel
            # (the state and running max in place)
            o = gated_decode_step_(
                q, k, v, rest[0], gates[0][1].weight, gates[0][1].bias, S0, a.scale, a.gate_logit_normalizer,
                a.clamp_min, *((rest[1], gates[1][1].weight, gates[1][1].bias) if a.use_refining_gate else ()),
                m=m0)
            return self._output(o, out_gate, h), (S0, m0, *conv) if use_cache else None
        z = [(linear(r, m[1].weight, m[1].bias) if low else r + m.bias).float().view(B, T, -1, Kd)
             for m, r in zip(gates, rest)]
        z_r = z[1] if a.use_refining_gate else None
        if a.feature_map == "safe_exp" and cu_seqlens is not None and m0 is not None:
            # packed sequences carrying states in (rare): the running max segment by segment
            parts = [maps_and_gate(a, q[:, s:e], k[:, s:e], z[0][:, s:e], None if z_r is None else z_r[:, s:e],
                                   m0[n:n + 1]) for n, (s, e) in enumerate(segments(cu_seqlens, T))]
            q, k, g = (torch.cat([p[i] for p in parts], 1) for i in range(3))
            m_last = torch.cat([p[3] for p in parts], 0)
        else:
            seg = ends = None
            if cu_seqlens is not None:
                seg, ends = segment_ids(cu_seqlens, T), (cu_seqlens[1:] - 1).long()
            q, k, g, m_last = _fused_maps_and_gate(a, q, k, z[0], z_r, m0, mask, seg, ends)
        if G > 1:
            k, v, g = (t.repeat_interleave(G, dim=2) for t in (k, v, g))
        # Under autocast the feature maps' exp runs in float32 while the projections give bf16;
        # the kernels take one dtype for q, k and v: the projections' (compute) dtype, so
        # training stays on bf16 tensor cores. phi values lie in (0, 1]: bf16 holds them well.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if decode:
            # the state is updated in place, so a step allocates no state (CUDA graphs)
            o, S = decode_step_(q, k, v, g, S0, a.scale), S0
        else:
            op = fused_recurrent_gla if (T <= RECURRENT_MAX_T and not self.training) else chunk_gla
            o, S = op(q, k, v, g, a.scale, S0, use_cache, cu_seqlens)
        if not use_cache:
            return self._output(o, out_gate, h), None
        if m_last is not None:  # a view of the last position: the gated decode step updates it in place
            m_last = m_last.contiguous()
        return self._output(o, out_gate, h), (S, m_last, *conv)

    def _gated_step_ok(self, q, m0, mask):
        """Whether a decode step can run as one ``gated_decode_step_``: the Triton kernel (CUDA),
        low-rank gates, one query head per key head, the identity or safe-exp map (with its
        running max carried in), no padding."""
        a = self.args
        return (use_triton(q) and a.gate_low_rank_dim > 0 and a.num_kv_groups == 1 and mask is None
                and (a.feature_map == "identity" or (a.feature_map == "safe_exp" and m0 is not None)))

    def _output(self, o, out_gate, h):
        # the per-head norm and the output gate: recomputed in the backward, folded into the
        # o projection's GEMV at decode (see project_add)
        a = self.args
        norm = getattr(self, a.norm_name) if a.attn_norm != "none" else None
        return project_add(o, self.o_proj.weight, h, pre=HeadNormGate(norm, out_gate))


class GatedSlotAttention(_Mixer):
    """A gsa layer, laid out as fla's ``GatedSlotAttention``; its state is the slot keys and
    values ``(hk, hv)``, followed by the short convolutions' states when it has them."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.args, self.layer_idx = args, layer_idx
        d = args.hidden_size
        self._init_qkv(args)
        self.f_proj = nn.Linear(d, args.num_kv_heads * args.num_slots, bias=False)
        self.g_norm = RMSNorm(d, GSA_OUTPUT_NORM_EPS, args.elementwise_affine)
        self.o_proj = nn.Linear(args.value_dim, d, bias=False)

    def forward(self, h, norm, state=None, cu_seqlens=None, use_cache=False, pad=None):
        a = self.args
        B, T, _ = h.shape
        G = a.num_kv_groups
        mask = None if pad is None else pad[:, -T:]
        ws = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.f_proj.weight]
        q, k, v, f = project(h, ws, norm).split([w.shape[0] for w in ws], -1)
        hk0, hv0, *conv0 = (None, None) if state is None else state
        q, k, v, conv = self._convolve(q, k, v, conv0, cu_seqlens, use_cache, mask)
        if (T == 1 and use_cache and hk0 is not None and cu_seqlens is None and not torch.is_grad_enabled()
                and hk0.dtype == hv0.dtype == torch.float32 and hk0.is_contiguous() and hv0.is_contiguous()):
            # a decode step from the projections, the slot states in place (one Triton kernel on
            # CUDA); a padded position's gate logit +inf gives g = 0 and s = 0, as slot_gate's keep
            if mask is not None:
                f = torch.where(mask[..., None], f, float("inf"))
            o = gsa_decode_step_(*(x.view(B, T, -1, d) for x, d in ((q, a.head_k_dim), (k, a.head_k_dim),
                                                                   (v, a.head_v_dim), (f, a.num_slots))),
                                 a.scale, hk0, hv0, a.feature_map, a.gate_logit_normalizer)
            return self._output(o, h), (hk0, hv0, *conv)
        q = lm.feature_map(TORCH, q.view(B, T, -1, a.head_k_dim), a.feature_map)
        k = lm.feature_map(TORCH, k.view(B, T, -1, a.head_k_dim), a.feature_map)
        v = F.silu(v.view(B, T, -1, a.head_v_dim))
        g, s = lm.slot_gate(TORCH, f.float().view(B, T, -1, a.num_slots), a.gate_logit_normalizer,
                            None if mask is None else mask[..., None, None])
        if G > 1:
            k, v, g, s = (t.repeat_interleave(G, dim=2) for t in (k, v, g, s))
        chunked = T > RECURRENT_MAX_T or self.training
        s = s.to(q.dtype)
        new_state = None
        if cu_seqlens is not None and chunked and hk0 is None and not use_cache:
            # packed training rows: every sequence in one pass (a loop over a row's documents
            # costs a pass each: ~6x slower training)
            o, _ = chunk_gsa(q, k, v, s, g, a.scale, chunked=True, cu_seqlens=cu_seqlens)
        else:
            outs, states = [], []
            for n, (b, e) in enumerate(segments(cu_seqlens, T)):
                st = None if hk0 is None else (hk0, hv0)
                if st is not None and cu_seqlens is not None:
                    st = tuple(t[n:n + 1] for t in st)
                o, st = chunk_gsa(q[:, b:e], k[:, b:e], v[:, b:e], s[:, b:e], g[:, b:e], a.scale,
                                  st, True, chunked=chunked)
                outs.append(o)
                states.append(st)
            o = torch.cat(outs, 1)
            if use_cache:
                new_state = (*(torch.cat([st[i] for st in states], 0) for i in range(2)), *conv)
        return self._output(o, h), new_state

    def _output(self, o, h):
        # silu, the output norm and the o projection: one GEMV at decode
        return project_add(o.flatten(2), self.o_proj.weight, h, pre=SiluNorm(self.g_norm))


def lm_loss_by_blocks(h, norm, head, labels, rows=4096):
    """``next_token_loss(project(h, [head], norm), labels, "mean")`` holding the logits of one
    block of ``rows`` positions at a time: each block is checkpointed, so the backward forms its
    logits again (one more head matmul) instead of keeping them all."""
    x = h[:, :-1].flatten(0, 1)
    y = labels[:, 1:].flatten()
    total = h.new_zeros((), dtype=torch.float32)
    for r in range(0, len(y), rows):
        total = total + torch.utils.checkpoint.checkpoint(
            lambda xb, yb: F.cross_entropy(norm_linear(xb, norm.weight, norm.eps, head).float(), yb,
                                           ignore_index=-100, reduction="sum"),
            x[r:r + rows], y[r:r + rows], use_reentrant=False)
    return total / (y != -100).sum()


def rope(x, positions, inv_freq):
    """Llama's rotary embedding (rotate-half) on ``x [B,T,H,D]``; ``positions`` is [T], or [B,T]
    when rows of a padded batch sit at different positions."""
    D = x.shape[-1]
    ang = positions.float()[..., None] * inv_freq  # [T or B,T, D/2]
    if ang.dim() == 2:
        ang = ang[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, :, None], torch.cat([ang.sin()] * 2, -1)[:, :, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return (x.float() * cos + torch.cat([-x2, x1], -1).float() * sin).to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Llama-style causal attention (RoPE, grouped kv heads) for hybrid stacks."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.args, self.layer_idx = args, layer_idx
        d, D, bias = args.hidden_size, args.softmax_head_dim, args.softmax_qkv_bias
        self.q_proj = nn.Linear(d, args.softmax_num_heads * D, bias=bias)
        self.k_proj = nn.Linear(d, args.softmax_num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(d, args.softmax_num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(args.softmax_num_heads * D, d, bias=args.softmax_o_bias)
        # a plain list, not a buffer: models built on the meta device (loading) get real values
        self._inv_freq_list, self._inv_freq = lm.rope_inv_freq(D, args.rope_theta, args.softmax_rope_scaling), None

    def inv_freq(self, device):
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = torch.tensor(self._inv_freq_list, dtype=torch.float32, device=device)
        return self._inv_freq

    def forward(self, h, norm, state=None, cu_seqlens=None, use_cache=False, pad=None):
        a = self.args
        B, T, _ = h.shape
        D = a.softmax_head_dim
        ws = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        qkv = project(h, ws, norm)
        if a.softmax_qkv_bias:
            qkv = qkv + torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]).to(qkv.dtype)
        q, k, v = (t.view(B, T, -1, D) for t in qkv.split([w.shape[0] for w in ws], -1))
        past = 0 if state is None else state[0].shape[1]
        if pad is not None:  # padded batch: each row counts positions from its first real token
            pos = (pad.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        elif cu_seqlens is None:
            pos = torch.arange(past, past + T, device=h.device)
        else:  # positions restart at every packed sequence
            pos = torch.cat([torch.arange(e - b, device=h.device) for b, e in segments(cu_seqlens, T)])
        inv_freq = self.inv_freq(h.device)
        q, k = rope(q, pos, inv_freq), rope(k, pos, inv_freq)
        if state is not None:
            k, v = torch.cat([state[0], k], 1), torch.cat([state[1], v], 1)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        G = a.softmax_num_heads // a.softmax_num_kv_heads
        if G > 1:
            kt, vt = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)
        if pad is not None:
            # keys: real ones, causally; a padded query sees only itself (a row of -inf would
            # give NaN, which the linear layers' masking cannot contain)
            j = torch.arange(past + T, device=h.device)
            i = past + torch.arange(T, device=h.device)
            causal = j[None, :] <= i[:, None]
            mask = (causal[None] & pad[:, None, :]) | (j[None, None, :] == i[None, :, None])
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None])
        elif cu_seqlens is not None:
            seg = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=h.device),
                                          (cu_seqlens[1:] - cu_seqlens[:-1]).to(h.device))
            mask = (seg[:, None] == seg[None, :]) & torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        elif past == 0:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        else:
            mask = torch.arange(past + T, device=h.device)[None, :] <= (past + torch.arange(T, device=h.device))[:, None]
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        o = o.transpose(1, 2).reshape(B, T, -1)
        if a.softmax_o_bias:
            h = h + self.o_proj.bias.to(h.dtype)
        return project_add(o, self.o_proj.weight, h), ((k, v) if use_cache else None)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, m = args.hidden_size, args.mlp_dim
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def forward(self, h, norm):
        """``h + down(silu(gate(norm(h))) * up(norm(h)))``."""
        gate_up = project(h, [self.gate_proj.weight, self.up_proj.weight], norm)
        return project_add(gate_up, self.down_proj.weight, h, glu=True)


ATTENTION = {"regla": LinearAttention, "gla": LinearAttention, "gsa": GatedSlotAttention,
             "softmax": SoftmaxAttention}


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.attn = ATTENTION[args.layer_type(layer_idx)](args, layer_idx)
        self.mlp_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, h, state=None, cu_seqlens=None, use_cache=False, pad=None):
        # Mixer and MLP take the residual stream and their pre-norm and return the updated
        # stream: at decode the norm and the residual add then run inside the projections.
        if state is None and not use_cache:
            return _stateless_block(self, h, cu_seqlens, pad), None
        h, state = self.attn(h, self.attn_norm, state, cu_seqlens, use_cache, pad)
        return self.mlp(h, self.mlp_norm), state


def _block(block, h, cu_seqlens, pad):
    h, _ = block.attn(h, block.attn_norm, None, cu_seqlens, False, pad)
    return block.mlp(h, block.mlp_norm)


_compiled_blocks = {}


def _stateless_block(block, h, cu_seqlens, pad):
    """A block with no state in or out. Training on CUDA runs it as one compiled graph each
    way (``fused``; the chunk op is a registered op inside it): one block is ~100 small
    kernels and autograd nodes, and launching them one by one from Python left the 350m
    step host-bound (364 ms of CPU for 115 ms of GPU work on the H200, BENCHMARKS section 2).

    Blocks of one layer type share the compiled code; each layer type compiles its own copy.
    Dynamo keeps its automatic-dynamic marks per function name: with one shared by all types,
    a GSA block compiled after a GLA one (two models in one process, as bench_train.py runs
    them) found the float expand_k that sets the head dims marked dynamic, and its chunk
    scan's checkpoint then failed to trace ("Source of ... is None")."""
    kind = type(block.attn)
    f = _compiled_blocks.get(kind)
    if f is None:  # a copy of _block's code under a name of its own (dynamo keys its state on the name)
        name = f"_block_{kind.__name__}"
        code = _block.__code__.replace(co_name=name, co_qualname=name)
        f = _compiled_blocks[kind] = fused(types.FunctionType(code, _block.__globals__, name))
    return f(block, h, cu_seqlens, pad)


class ReGLAModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)


class ReGLAPreTrainedModel(PreTrainedModel):
    config_class = ReGLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, ShortConvolution)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class ReGLAForCausalLM(ReGLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: ReGLAConfig):
        super().__init__(config)
        self.args = config.args
        self.model = ReGLAModel(self.args)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # linear layers keep a fixed-size state, not a growing KV cache

    def make_cache(self) -> RecurrentCache:
        return RecurrentCache([self.args.layer_type(i) != "softmax" for i in range(self.args.num_hidden_layers)])

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, labels=None,
                use_cache=None, cu_seqlens=None, logits_to_keep=0, **kwargs):
        pad = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # a padded batch (transformers' generate pads on the left): padded positions neither
            # write nor decay any state, so every row gets what it gets alone
            if cu_seqlens is not None:
                raise ValueError("give attention_mask (padded rows) or cu_seqlens (packed rows), not both")
            pad = attention_mask.bool()
        cache = cache if cache is not None else past_key_values
        use_cache = (not self.training) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = self.make_cache()
        states = cache.states if cache is not None else [None] * len(self.model.layers)
        h, states = self.hidden(input_ids, states, cu_seqlens, use_cache, logits_to_keep, pad)
        if use_cache:
            cache.states = states
            cache.seen_tokens += input_ids.shape[1]
        logits = loss = None
        if labels is not None and torch.is_grad_enabled():
            # a training step returns the loss alone: its logits, [B*T, vocab] with a float
            # copy and a log-softmax beside them (~5 GiB of a 350m step at 8 x 2048), are
            # formed a block of rows at a time and formed again in the backward
            loss = lm_loss_by_blocks(h, self.model.norm, self.head_weight(), labels)
        else:
            logits = project(h, [self.head_weight()], self.model.norm)
            if labels is not None:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})

    def head_weight(self):
        return self.model.embeddings.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def hidden(self, input_ids, states, cu_seqlens=None, use_cache=False, logits_to_keep=0, pad=None):
        """The last layer's output (before the final norm) and the layers' new states."""
        h = self.model.embeddings(input_ids)
        new = []
        for block, st in zip(self.model.layers, states):
            h, st = block(h, st, cu_seqlens, use_cache, pad)
            new.append(st)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return h, new

    def run_layers(self, input_ids, states, cu_seqlens=None, use_cache=False, logits_to_keep=0, pad=None):
        """Logits and the layers' new states: the forward pass on plain tensors and lists (no
        cache object), which is what ``GraphStep`` compiles and captures. ``pad`` [B, seen + T]
        (False at padding) is the attention mask of a padded batch."""
        h, new = self.hidden(input_ids, states, cu_seqlens, use_cache, logits_to_keep, pad)
        return project(h, [self.head_weight()], self.model.norm), new

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=True, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None and 0 < cache.seen_tokens < input_ids.shape[1]:
            # input_ids is the whole sequence (transformers' convention) and the state already
            # holds its first seen_tokens: feed only the rest, O(1) a token
            input_ids = input_ids[:, cache.seen_tokens:]
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache, "attention_mask": attention_mask,
                "logits_to_keep": kwargs.get("logits_to_keep", 1) or 1}
