"""ReGLA / GLA / GSA decoders in MLX, one file in the mlx-lm manner.

``Model(args)(inputs, cache=None) -> logits``, ``make_cache()``, ``sanitize(weights)`` and a
``layers`` property, so mlx-lm's generation, sampling and quantization utilities work with
it unchanged. Weight names are the HF/fla ones (``regla.spec.expected_shapes``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask, scaled_dot_product_attention
from mlx_lm.models.cache import ArraysCache, KVCache

from regla import layer_math as lm
from regla.spec import GSA_OUTPUT_NORM_EPS, ModelArgs

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


class _MLXOps:
    """``xp`` of ``regla.layer_math`` for MLX arrays."""

    exp, expm1, log1p, logaddexp, sigmoid = mx.exp, mx.expm1, mx.log1p, mx.logaddexp, mx.sigmoid
    maximum, minimum, where, stop_gradient = mx.maximum, mx.minimum, mx.where, mx.stop_gradient
    log_sigmoid, silu, relu = staticmethod(nn.log_sigmoid), staticmethod(nn.silu), staticmethod(nn.relu)

    @staticmethod
    def amax(x, axis, keepdims):
        return mx.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def sum(x, axis, keepdims):
        return mx.sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def cummax(x, axis):
        return mx.cummax(x, axis=axis)

    @staticmethod
    def concat(xs, axis):
        return mx.concatenate(xs, axis)

    @staticmethod
    def zeros(shape, like):
        return mx.zeros(shape, like.dtype)

    @staticmethod
    def take(x, index, axis):
        return mx.take(x, index, axis=axis)

    @staticmethod
    def take_along_axis(x, index, axis):
        return mx.take_along_axis(x, mx.broadcast_to(index, (*index.shape[:-1], x.shape[-1])), axis=axis)

    @staticmethod
    def arange(n, like):
        return mx.arange(n)

    @staticmethod
    def to_f64(x):
        return x.astype(mx.float64)

    @staticmethod
    def cast_like(x, like):
        return x.astype(like.dtype)


MLX = _MLXOps()


def repeat_heads(x, groups):
    return x if groups == 1 else mx.repeat(x, groups, axis=2)


class ShortConvolution(nn.Module):
    """fla's ShortConvolution (depthwise causal conv over time + silu) with its parameter names
    and shapes; the arithmetic is ``layer_math.short_conv``."""

    def __init__(self, width, kernel, bias=False):
        super().__init__()
        self.weight = mx.zeros((width, 1, kernel))
        if bias:
            self.bias = mx.zeros((width,))

    def __call__(self, x, state=None, mask=None):
        return lm.short_conv(MLX, x, self.weight, getattr(self, "bias", None), state, mask=mask)


def head_norm(args: ModelArgs, width):
    """The per-head norm of a linear layer's output (MATH.md section 2, step 6), or None."""
    if args.attn_norm == "rmsnorm":
        return nn.RMSNorm(width, eps=args.norm_eps) if args.elementwise_affine else _PlainRMSNorm(args.norm_eps)
    if args.attn_norm == "layernorm":
        return nn.LayerNorm(width, eps=args.norm_eps, affine=args.elementwise_affine)
    return None


class _PlainRMSNorm(nn.Module):
    """RMSNorm without a weight (fla's ``elementwise_affine=False``)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, None, self.eps)


class _Mixer(nn.Module):
    """What the linear layers share: q/k/v projections of the pre-normed input, optionally
    through fla's short convolutions. Cache slots: the layer's own states first (``n_states``),
    then the three convolution states. Every slot holds an array once used (mlx-lm's batching
    slices them all)."""

    n_states = 2

    @property
    def cache_size(self):
        return self.n_states + (3 if self.args.use_short_conv else 0)

    def _init_qkv(self, args: ModelArgs):
        d, G = args.hidden_size, args.num_kv_groups
        widths = (args.key_dim, args.key_dim // G, args.value_dim // G)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, w, bias=False) for w in widths)
        if args.use_short_conv:
            self.q_conv1d, self.k_conv1d, self.v_conv1d = (ShortConvolution(w, args.conv_size, args.conv_bias)
                                                           for w in widths)

    def _qkv(self, x, cache, mask):
        """q, k, v [B,T,width]; padded positions (``mask`` False) give zeros, so they write
        nothing into the state or the short convolutions' windows."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.args.use_short_conv:
            convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
            out = [conv(t, None if cache is None else cache[self.n_states + i], mask)
                   for i, (conv, t) in enumerate(zip(convs, (q, k, v)))]
            if cache is not None:
                for i, (_, st) in enumerate(out):
                    cache[self.n_states + i] = st
            q, k, v = (y for y, _ in out)
        if mask is not None:
            q, k, v = (mx.where(mask[..., None], t, 0) for t in (q, k, v))
        return q, k, v


class LinearAttention(_Mixer):
    """A regla or gla layer. Cache slots: the state S, the keys' running max m (safe-exp maps
    only), then the short convolutions' states."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.n_states = 2 if args.feature_map == "safe_exp" else 1
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

    def __call__(self, h, norm, cache=None):
        a = self.args
        x = norm(h)
        B, T, _ = x.shape
        Kd, Vd = a.head_k_dim, a.head_v_dim
        mask = create_ssm_mask(x, cache)  # padded batches (mlx-lm's BatchGenerator), else None
        q, k, v = self._qkv(x, cache, mask)
        q, k, v = q.reshape(B, T, -1, Kd), k.reshape(B, T, -1, Kd), v.reshape(B, T, -1, Vd)
        z_f = apply(self.gk_proj, x).astype(mx.float32).reshape(B, T, -1, Kd)
        z_r = apply(self.gr_proj, x).astype(mx.float32).reshape(B, T, -1, Kd) if a.use_refining_gate else None
        g = lm.log_forget_gate(MLX, z_f, z_r, a)
        if mask is not None:  # no decay at padded positions
            g = mx.where(mask[..., None, None], g, 0.0)
        S0 = m0 = None
        if cache is not None:
            S0, m0 = cache[0], (cache[1] if self.n_states == 2 else None)
        q = lm.feature_map(MLX, q, a.feature_map)
        if a.feature_map == "safe_exp":
            k, term, m_last = lm.safe_exp_keys(MLX, k.astype(mx.float32), m0, mask=mask)
            k = k.astype(q.dtype)
            g = g + term[..., None]
        else:
            k, m_last = lm.feature_map(MLX, k, a.feature_map), None
            if mask is not None:  # maps with phi(0) != 0 (elu, sigmoid) must not write either
                k = mx.where(mask[..., None, None], k, 0)
        k, v, g = (repeat_heads(t, a.num_kv_groups) for t in (k, v, g))
        op = recurrent_gla if T <= RECURRENT_MAX_T else chunk_gla
        o, S = op(q, k, v, g, a.scale, S0, cache is not None)
        if cache is not None:
            cache[0] = S
            if self.n_states == 2:
                cache[1] = m_last
            cache.advance(T)
        if a.attn_norm != "none":
            o = getattr(self, a.norm_name)(o)
        o = o.reshape(B, T, -1)
        if a.use_output_gate:
            o = o * nn.silu(self.g_proj(x))
        return h + self.o_proj(o)


class GatedSlotAttention(_Mixer):
    """A gsa layer, laid out as fla's ``GatedSlotAttention``. Cache slots: the slot keys and
    values, then the short convolutions' states."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d = args.hidden_size
        self._init_qkv(args)
        self.f_proj = nn.Linear(d, args.num_kv_heads * args.num_slots, bias=False)
        self.g_norm = nn.RMSNorm(d, eps=GSA_OUTPUT_NORM_EPS) if args.elementwise_affine \
            else _PlainRMSNorm(GSA_OUTPUT_NORM_EPS)
        self.o_proj = nn.Linear(args.value_dim, d, bias=False)

    def __call__(self, h, norm, cache=None):
        a = self.args
        x = norm(h)
        B, T, _ = x.shape
        mask = create_ssm_mask(x, cache)
        q, k, v = self._qkv(x, cache, mask)
        q = lm.feature_map(MLX, q.reshape(B, T, -1, a.head_k_dim), a.feature_map)
        k = lm.feature_map(MLX, k.reshape(B, T, -1, a.head_k_dim), a.feature_map)
        v = nn.silu(v.reshape(B, T, -1, a.head_v_dim))
        g, s = lm.slot_gate(MLX, self.f_proj(x).astype(mx.float32).reshape(B, T, -1, a.num_slots),
                            a.gate_logit_normalizer, None if mask is None else mask[..., None, None])
        k, v, g, s = (repeat_heads(t, a.num_kv_groups) for t in (k, v, g, s))
        state = None
        if cache is not None and cache[0] is not None:
            state = (cache[0], cache[1])
        o, state = chunk_gsa(q, k, v, s.astype(q.dtype), g, a.scale, state, True, chunked=T > RECURRENT_MAX_T)
        if cache is not None:
            cache[0], cache[1] = state
            cache.advance(T)
        return h + self.o_proj(self.g_norm(nn.silu(o.reshape(B, T, -1))))


class SoftmaxAttention(nn.Module):
    """Llama-style causal attention (RoPE, grouped kv heads) for hybrid stacks."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d, D, bias = args.hidden_size, args.softmax_head_dim, args.softmax_qkv_bias
        self.q_proj = nn.Linear(d, args.softmax_num_heads * D, bias=bias)
        self.k_proj = nn.Linear(d, args.softmax_num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(d, args.softmax_num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(args.softmax_num_heads * D, d, bias=args.softmax_o_bias)
        # mx.fast.rope takes the periods 1/inv_freq; a leading underscore keeps them out of the weights
        inv = lm.rope_inv_freq(D, args.rope_theta, args.softmax_rope_scaling)
        self._periods = None if args.softmax_rope_scaling is None else mx.array([1.0 / f for f in inv], dtype=mx.float32)

    def _rope(self, x, offset):
        D = self.args.softmax_head_dim
        if self._periods is None:
            return mx.fast.rope(x, D, traditional=False, base=self.args.rope_theta, scale=1.0, offset=offset)
        return mx.fast.rope(x, D, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._periods)

    def __call__(self, h, norm, cache=None):
        a = self.args
        x = norm(h)
        B, T, _ = x.shape
        D = a.softmax_head_dim
        q = self.q_proj(x).reshape(B, T, -1, D).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, -1, D).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, -1, D).transpose(0, 2, 1, 3)
        # mlx-lm's mask and offsets: with its batched caches (BatchKVCache) they carry each
        # row's padding and position
        mask = create_attention_mask(x, cache)
        offset = 0 if cache is None else cache.offset
        q, k = self._rope(q, offset), self._rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=D ** -0.5, mask=mask)
        return h + self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, m = args.hidden_size, args.mlp_dim
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def __call__(self, h, norm):
        """``h + down(silu(gate(norm(h))) * up(norm(h)))``."""
        x = norm(h)
        return h + self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


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
        # Mixers and the MLP take the residual stream and their pre-norm and return the updated
        # stream: one contract with the PyTorch layers (which fuse norm and residual at decode).
        h = self.attn(h, self.attn_norm, cache)
        return self.mlp(h, self.mlp_norm)


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
        """Fixed-size state for linear layers (an ``ArraysCache``: ``(S, m)``, ``(S,)`` or
        ``(hk, hv)``, then three short-convolution states when the config has them), a growing
        KV cache only for softmax layers."""
        return [KVCache() if isinstance(layer.attn, SoftmaxAttention) else ArraysCache(size=layer.attn.cache_size)
                for layer in self.layers]

    def sanitize(self, weights):
        from regla.checkpoint import sanitize

        return sanitize(weights, self.args)
