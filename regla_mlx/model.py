"""ReGLA / GLA / GSA decoders in MLX, one file in the mlx-lm manner.

``Model(args)(inputs, cache=None) -> logits``, ``make_cache()``, ``sanitize(weights)`` and a
``layers`` property, so mlx-lm's generation, sampling and quantization utilities work with
it unchanged. Weight names are the HF/fla ones (``regla.spec.expected_shapes``).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache

from regla.spec import ModelArgs

from .ops import chunk_gla, chunk_gsa, recurrent_gla

# Below this many tokens the recurrent op is used (decode, short prefill), as in fla.
RECURRENT_MAX_T = 64


def low_rank(d_in, d_out, rank):
    """fla's gate projection ``[Linear(d, r), Linear(r, out, bias)]``; rank 0 means full rank."""
    if rank == 0:
        return nn.Linear(d_in, d_out, bias=True)
    return [nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=True)]


def apply(proj, x):
    if isinstance(proj, list):
        for p in proj:
            x = p(x)
        return x
    return proj(x)


def refined_log_gate(log_f, z_r):
    """log alpha of the refining gate; see ``regla.spec.refined_log_gate`` for the branches."""
    big = mx.maximum(log_f, -1.0)
    one_minus_f = -mx.expm1(big)
    near_one = mx.log1p(-one_minus_f * (one_minus_f + 2.0 * mx.exp(big) * mx.sigmoid(-z_r)))
    small = mx.minimum(log_f, -1.0)
    far = small + mx.logaddexp(small, math.log(2.0) + nn.log_sigmoid(z_r) + mx.log1p(-mx.exp(small)))
    return mx.where(log_f > -1.0, near_one, far)


def feature_map(x, name):
    if name == "safe_exp":
        return mx.exp(x - mx.max(x, axis=-1, keepdims=True))
    if name == "identity":
        return x
    if name == "elu":
        return nn.elu(x) + 1.0
    if name == "relu":
        return nn.relu(x)
    if name == "softmax":
        return mx.softmax(x, axis=-1)
    if name == "swish":
        return nn.silu(x)
    raise ValueError(f"unknown feature_map {name!r}")


def safe_exp_keys(k, m_prev=None):
    """Causal safe-exp key map: ``(exp(k - m_t), log-gate term, m_T)``, m a stop-gradient running max."""
    tok = mx.stop_gradient(mx.max(k, axis=-1))  # [B,T,H]
    if m_prev is not None:
        tok = mx.concatenate([m_prev[:, None].astype(tok.dtype), tok], 1)
    m = mx.cummax(tok, axis=1)
    if m_prev is None:
        m_before = mx.concatenate([m[:, :1], m[:, :-1]], 1)
    else:
        m_before, m = m[:, :-1], m[:, 1:]
    return mx.exp(k - m[..., None]), -(m - m_before), m[:, -1]


def repeat_heads(x, groups):
    return x if groups == 1 else mx.repeat(x, groups, axis=2)


class LinearAttention(nn.Module):
    """A regla or gla layer."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d, G = args.hidden_size, args.num_kv_groups
        self.q_proj = nn.Linear(d, args.key_dim, bias=False)
        self.k_proj = nn.Linear(d, args.key_dim // G, bias=False)
        self.v_proj = nn.Linear(d, args.value_dim // G, bias=False)
        self.gk_proj = low_rank(d, args.key_dim // G, args.gate_low_rank_dim)
        if args.use_refining_gate:
            self.gr_proj = low_rank(d, args.key_dim // G, args.gate_low_rank_dim)
        if args.use_output_gate:
            self.g_proj = nn.Linear(d, args.value_dim, bias=False)
        if args.attn_norm == "rmsnorm":
            setattr(self, args.norm_name, nn.RMSNorm(args.head_v_dim, eps=args.norm_eps))
        elif args.attn_norm == "layernorm":
            setattr(self, args.norm_name, nn.LayerNorm(args.head_v_dim, eps=args.norm_eps))
        self.o_proj = nn.Linear(args.value_dim, d, bias=False)

    def __call__(self, x, cache=None):
        a = self.args
        B, T, _ = x.shape
        Kd, Vd = a.head_k_dim, a.head_v_dim
        q = self.q_proj(x).reshape(B, T, -1, Kd)
        k = self.k_proj(x).reshape(B, T, -1, Kd)
        v = self.v_proj(x).reshape(B, T, -1, Vd)
        log_f = nn.log_sigmoid(apply(self.gk_proj, x).astype(mx.float32)).reshape(B, T, -1, Kd)
        log_f = log_f / a.gate_logit_normalizer
        if a.use_refining_gate:
            g = refined_log_gate(log_f, apply(self.gr_proj, x).astype(mx.float32).reshape(B, T, -1, Kd))
        else:
            g = log_f
        if a.clamp_min is not None:
            g = mx.maximum(g, a.clamp_min)
        S0 = m0 = None
        if cache is not None:
            S0, m0 = cache[0], cache[1]
        q = feature_map(q, a.feature_map)
        if a.feature_map == "safe_exp":
            k, term, m_last = safe_exp_keys(k.astype(mx.float32), m0)
            k = k.astype(q.dtype)
            g = g + term[..., None]
        else:
            k, m_last = feature_map(k, a.feature_map), None
        k, v, g = (repeat_heads(t, a.num_kv_groups) for t in (k, v, g))
        op = recurrent_gla if T <= RECURRENT_MAX_T else chunk_gla
        o, S = op(q, k, v, g, a.scale, S0, cache is not None)
        if cache is not None:
            cache[0], cache[1] = S, m_last
        if a.attn_norm != "none":
            o = getattr(self, a.norm_name)(o)
        o = o.reshape(B, T, -1)
        if a.use_output_gate:
            o = o * nn.silu(self.g_proj(x))
        return self.o_proj(o)


class GatedSlotAttention(nn.Module):
    """A gsa layer, laid out as fla's ``GatedSlotAttention``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d, G = args.hidden_size, args.num_kv_groups
        self.q_proj = nn.Linear(d, args.key_dim, bias=False)
        self.k_proj = nn.Linear(d, args.key_dim // G, bias=False)
        self.v_proj = nn.Linear(d, args.value_dim // G, bias=False)
        self.f_proj = nn.Linear(d, args.num_kv_heads * args.num_slots, bias=False)
        self.g_norm = nn.RMSNorm(d, eps=args.norm_eps)
        self.o_proj = nn.Linear(args.value_dim, d, bias=False)

    def __call__(self, x, cache=None):
        a = self.args
        B, T, _ = x.shape
        q = feature_map(self.q_proj(x).reshape(B, T, -1, a.head_k_dim), a.feature_map)
        k = feature_map(self.k_proj(x).reshape(B, T, -1, a.head_k_dim), a.feature_map)
        v = nn.silu(self.v_proj(x).reshape(B, T, -1, a.head_v_dim))
        g = nn.log_sigmoid(self.f_proj(x).astype(mx.float32)).reshape(B, T, -1, a.num_slots)
        g = g / a.gate_logit_normalizer
        s = -mx.expm1(g)
        k, v, g, s = (repeat_heads(t, a.num_kv_groups) for t in (k, v, g, s))
        state = None
        if cache is not None and cache[0] is not None:
            state = (cache[0], cache[1])
        o, state = chunk_gsa(q, k, v, s.astype(q.dtype), g, a.scale, state, True, chunked=T > RECURRENT_MAX_T)
        if cache is not None:
            cache[0], cache[1] = state
        return self.o_proj(self.g_norm(nn.silu(o.reshape(B, T, -1))))


class SoftmaxAttention(nn.Module):
    """Llama-style causal attention (RoPE, grouped kv heads) for hybrid stacks."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d, D = args.hidden_size, args.softmax_head_dim
        self.q_proj = nn.Linear(d, args.softmax_num_heads * D, bias=False)
        self.k_proj = nn.Linear(d, args.softmax_num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(d, args.softmax_num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(args.softmax_num_heads * D, d, bias=False)

    def __call__(self, x, cache=None):
        a = self.args
        B, T, _ = x.shape
        D = a.softmax_head_dim
        q = self.q_proj(x).reshape(B, T, -1, D).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, -1, D).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, -1, D).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        q = mx.fast.rope(q, D, traditional=False, base=a.rope_theta, scale=1.0, offset=offset)
        k = mx.fast.rope(k, D, traditional=False, base=a.rope_theta, scale=1.0, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        mask = "causal" if T > 1 else None
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, m = args.hidden_size, args.mlp_dim
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


ATTENTION = {"regla": LinearAttention, "gla": LinearAttention, "gsa": GatedSlotAttention,
             "softmax": SoftmaxAttention}


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.attn = ATTENTION[args.layer_type(layer_idx)](args)
        self.mlp_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.mlp = MLP(args)

    def __call__(self, h, cache=None):
        h = h + self.attn(self.attn_norm(h), cache)
        return h + self.mlp(self.mlp_norm(h))


class ReGLAModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = "regla"
        self.model = ReGLAModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, **kwargs):
        h = self.model.embeddings(inputs)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, None if cache is None else cache[i])
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embeddings.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        """Fixed-size state for linear layers (``ArraysCache(2)``: ``(S, m)``, ``(S, None)`` or
        ``(hk, hv)``), a growing KV cache only for softmax layers."""
        return [KVCache() if self.args.layer_type(i) == "softmax" else ArraysCache(size=2)
                for i in range(self.args.num_hidden_layers)]

    def sanitize(self, weights):
        from regla.checkpoint import sanitize

        return sanitize(weights, self.args)
