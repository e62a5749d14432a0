"""The linear layers' elementwise math, written once for NumPy, PyTorch and MLX.

Every function takes ``xp``, a small namespace of array functions (``NUMPY`` below, used by
the float64 spec; ``regla_torch.ops.utils.TORCH`` and ``regla_mlx.model.MLX``), so the spec and
both backends run the same lines for the feature maps, the forget gate (log-sigmoid over a
normalizer, ReGLA's refining gate, the clamp), the causal safe-exp key map with its running
max (MATH.md section 2) and fla's short convolution. A namespace needs: exp, expm1, log1p,
logaddexp, sigmoid, log_sigmoid, silu, relu, maximum(x, scalar), minimum(x, scalar), where,
amax(x, axis, keepdims), sum(x, axis, keepdims), cummax(x, axis), concat(xs, axis),
zeros(shape, like), stop_gradient, take(x, index, axis), take_along_axis(x, index, axis) (index
[..., 1], spread over the last axis), arange(n, like) (integers, on like's device), to_f64,
cast_like(x, like).

Padded batches: where a function takes ``mask`` ([B,T] bool, True at real tokens), padded
positions neither write the state nor decay it nor move the running max, so every row gets
what it would get alone (mlx-lm's batching, transformers' left-padded ``generate``).

Imports nothing but the standard library, so it travels with the MLX model file.
"""

from __future__ import annotations

import math

FEATURE_MAPS = ("safe_exp", "identity", "elu", "relu", "softmax", "swish", "sigmoid", "sqrelu")


def feature_map(xp, x, name):
    """The per-token maps (queries always; keys for every map except safe-exp, whose key side
    is ``safe_exp_keys``). ``elu`` is elu + 1 (positive, as in linear transformers);
    ``sigmoid``, ``sqrelu``, ``relu`` and ``swish`` are fla's GLA maps of those names."""
    if name == "safe_exp":
        return xp.exp(x - xp.amax(x, -1, True))
    if name == "identity":
        return x
    if name == "elu":
        return xp.where(x > 0, x + 1.0, xp.exp(xp.minimum(x, 0.0)))
    if name == "relu":
        return xp.relu(x)
    if name == "softmax":
        e = xp.exp(x - xp.amax(x, -1, True))
        return e / xp.sum(e, -1, True)
    if name == "swish":
        return xp.silu(x)
    if name == "sigmoid":
        return xp.sigmoid(x)
    if name == "sqrelu":
        r = xp.relu(x)
        return r * r
    raise ValueError(f"unknown feature_map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")


def refined_log_gate(xp, log_f, z_r):
    """log alpha for alpha = r(1-(1-f)^2) + (1-r) f^2, r = sigmoid(z_r) (MATH.md section 2.4).

    Equal to MATH.md's ``log1p(-(1-f)(1+f(1-2r)))``, written in two branches that are each exact
    in floating point: near f = 1 that log1p form (its factor ``1 + f(1-2r)`` written as
    ``(1-f) + 2f(1-r)``, two positive terms, no cancellation as r -> 1), and for small f the
    factored form ``log f + log(f + 2r(1-f))``, a sum of positive terms, which the log1p form
    would round to log(0). Each branch sees inputs clamped to its own side, so neither makes an
    inf whose zero-weighted gradient would turn into NaN.
    """
    big = xp.maximum(log_f, -1.0)
    one_minus_f = -xp.expm1(big)
    near_one = xp.log1p(-one_minus_f * (one_minus_f + 2.0 * xp.exp(big) * xp.sigmoid(-z_r)))
    small = xp.minimum(log_f, -1.0)
    far = small + xp.logaddexp(small, math.log(2.0) + xp.log_sigmoid(z_r) + xp.log1p(-xp.exp(small)))
    return xp.where(log_f > -1.0, near_one, far)


def log_forget_gate(xp, z_f, z_r, args):
    """The per-key-channel log gate from the gate projections' outputs (float32 or wider):
    ``logsigmoid(z_f) / gate_logit_normalizer``, refined with ``z_r`` for regla, then clamped."""
    g = xp.log_sigmoid(z_f) / args.gate_logit_normalizer
    if args.use_refining_gate:
        g = refined_log_gate(xp, g, z_r)
    if args.clamp_min is not None:
        g = xp.maximum(g, args.clamp_min)
    return g


def slot_gate(xp, f, normalizer, keep=None):
    """GSA's log slot gate ``g = logsigmoid(f) / normalizer`` and slot weights ``s = 1 - exp(g)``
    (MATH.md section 4) from the slot gate logits (float32 or wider). ``keep`` (broadcasting
    with g): False at padding, where g = 0 (no decay) and so s = 0 (no slot write)."""
    g = xp.log_sigmoid(f) / normalizer
    if keep is not None:
        g = xp.where(keep, g, 0.0)
    return g, -xp.expm1(g)


def safe_exp_keys(xp, k, m_prev=None, seg=None, ends=None, mask=None):
    """Causal safe-exp key map (MATH.md section 2): ``(exp(k - m_t), log-gate term, m_T)``.

    ``m_t = max(m_{t-1}, max_j k_t[j])`` per head (a running max over time and channels),
    ``phi(k_t) = exp(k_t - m_t)`` and the term ``-(m_t - m_{t-1})`` added to every channel of
    the log gate (``m_0 = m_1`` unless ``m_prev`` [B,H] carries a running max in). m is a
    constant for gradients: the normalized output does not depend on it.

    ``seg`` ([T] sequence index of a packed row, B == 1, no ``m_prev``) restarts the max at
    every sequence; ``ends`` ([N] index of each sequence's last row) picks the N final maxima.
    ``mask`` ([B,T], True at real tokens) leaves padded positions out: their keys map to 0
    and their gate term is 0, and a row that starts with padding starts its max at its
    first real token.
    """
    tok = xp.stop_gradient(xp.amax(k, -1, False))  # [B,T,H]
    if seg is not None:
        # One cummax for the whole row: lift each sequence above every earlier one (in float64,
        # exact enough), so no maximum leaks across a sequence start.
        t = xp.to_f64(tok)
        span = xp.amax(xp.amax(t, 1, False), 1, False) - (-xp.amax(xp.amax(-t, 1, False), 1, False))
        lift = xp.to_f64(seg)[None, :, None] * 2.0 * (span[:, None, None] + 1.0)
        m = xp.cast_like(xp.cummax(t + lift, 1) - lift, tok)
        first = xp.concat([seg[:1] == seg[:1], seg[1:] != seg[:-1]], 0)
        m_before = xp.where(first[None, :, None], m, xp.concat([m[:, :1], m[:, :-1]], 1))
        return xp.exp(k - m[..., None]), -(m - m_before), xp.take(m[0], ends, 0)
    if mask is not None:
        tok = xp.where(mask[..., None], tok, float("-inf"))
    if m_prev is None:
        m = xp.cummax(tok, 1)
        m_before = xp.concat([m[:, :1], m[:, :-1]], 1)
    else:
        # m_t = max(m_prev, max_{s<=t} tok_s): the carried max as row 0 of one cummax. At decode
        # this form compiles faster than a one-token special case (an elementwise max, no scan):
        # Inductor fused that one into a 5.4 us reduction kernel a layer, 1,398 against 1,315 us
        # of kernels a 1.3B ReGLA step, 675 against 716 tok/s (H200, BENCHMARKS section 1, decode)
        m = xp.cummax(xp.concat([xp.cast_like(m_prev, tok)[:, None], tok], 1), 1)
        m_before, m = m[:, :-1], m[:, 1:]
    if mask is None:
        return xp.exp(k - m[..., None]), -(m - m_before), m[:, -1]
    # before a row's first real token m is -inf: that token starts the max (m_0 = m_1)
    m_before = xp.where(m_before == float("-inf"), m, m_before)
    keep = mask[..., None]
    phi = xp.where(keep[..., None], xp.exp(k - xp.where(keep, m, 0.0)[..., None]), 0.0)
    return phi, xp.where(keep, -(m - m_before), 0.0), m[:, -1]


def short_conv(xp, x, weight, bias=None, state=None, seg=None, mask=None):
    """fla's ShortConvolution: a depthwise causal convolution over time, then silu.

    ``x`` [B,T,D]; ``weight`` [D,1,W] (torch's Conv1d layout, as fla saves it); ``state``
    [B,W-1,D], the inputs just before x (None: zeros, a sequence start). Returns
    ``(y [B,T,D], new_state [B,W-1,D])``: the cache a decode step needs stays W-1 rows.
    ``seg`` ([T] sequence index of a packed row, B == 1, no state) keeps every sequence's
    window inside it (the returned state is then meaningless). ``mask`` ([B,T], True at real
    tokens; left or right padding) zeroes padded inputs, so a left-padded row starts from a
    zero window as it would alone, and takes each row's state after its last real token.
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    if state is None:
        state = xp.zeros((B, W - 1, D), x)
    if mask is not None:
        x = xp.where(mask[..., None], x, 0.0)
    xs = xp.concat([xp.cast_like(state, x), x], 1)  # [B, T+W-1, D]: row p is time p - (W-1)
    y = xs[:, W - 1:] * weight[:, 0, W - 1]
    for lag in range(1, W):
        term = xs[:, W - 1 - lag:W - 1 - lag + T] * weight[:, 0, W - 1 - lag]
        if seg is not None:  # time t reads t - lag only inside its own sequence
            same = xp.concat([seg[:lag] == seg[:lag], seg[lag:] == seg[:-lag]], 0)
            term = xp.where(same[None, :, None], term, 0.0)
        y = y + term
    if bias is not None:
        y = y + bias
    if mask is None:
        return xp.silu(y), xs[:, T:]
    # a row's state holds the W-1 inputs up to its last real token: xs rows end .. end+W-2
    end = xp.amax(xp.where(mask, xp.arange(T, mask)[None, :] + 1, 0), 1, False)  # [B]
    rows = end[:, None] + xp.arange(W - 1, mask)[None, :]
    return xp.silu(y), xp.take_along_axis(xs, rows[..., None], 1)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(scaling) -> str:
    """The kind of a ``rope_scaling`` dict (transformers spells it ``rope_type``, older configs ``type``)."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> list:
    """RoPE's inverse frequencies ``theta^(-2i/D)`` as transformers computes them, with the
    scalings regla implements: ``linear`` (positions divided by ``factor``, i.e. every frequency)
    and ``llama3`` (Llama 3.1's band-wise rescaling). Others raise ValueError naming them."""
    inv = [theta ** (-i / head_dim) for i in range(0, head_dim, 2)]
    kind = rope_type(scaling)
    if kind == "default":
        return inv
    if kind == "linear":
        return [f / float(scaling["factor"]) for f in inv]
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = float(scaling["original_max_position_embeddings"])
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / high:  # high frequencies: kept
                out.append(f)
            elif wavelen > old / low:  # low frequencies: scaled down
                out.append(f / factor)
            else:  # between: a smooth blend of the two
                smooth = (old / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out
    raise ValueError(f"rope_scaling type {kind!r} is not implemented (regla implements "
                     f"{', '.join(ROPE_TYPES)}); it changes the positions' encoding, so the softmax "
                     "layers would not compute what the checkpoint was trained with")


class _NumPyOps:
    """``xp`` for NumPy (the spec runs it on float64 arrays)."""

    def __init__(self):
        import numpy as np

        self.np = np

    def __getattr__(self, name):  # exp, expm1, log1p, logaddexp, where, ...
        return getattr(self.np, name)

    def sigmoid(self, x):
        return 1.0 / (1.0 + self.np.exp(-x))

    def log_sigmoid(self, x):
        return self.np.minimum(x, 0.0) - self.np.log1p(self.np.exp(-self.np.abs(x)))

    def silu(self, x):
        return x / (1.0 + self.np.exp(-x))

    def relu(self, x):
        return self.np.maximum(x, 0.0)

    def amax(self, x, axis, keepdims):
        return x.max(axis, keepdims=keepdims)

    def sum(self, x, axis, keepdims):
        return x.sum(axis, keepdims=keepdims)

    def cummax(self, x, axis):
        return self.np.maximum.accumulate(x, axis=axis)

    def concat(self, xs, axis):
        return self.np.concatenate(xs, axis)

    def zeros(self, shape, like):
        return self.np.zeros(shape, like.dtype)

    def stop_gradient(self, x):
        return x

    def take(self, x, index, axis):
        return self.np.take(x, index, axis)

    def take_along_axis(self, x, index, axis):
        return self.np.take_along_axis(x, self.np.broadcast_to(index, index.shape[:-1] + (x.shape[-1],)), axis)

    def arange(self, n, like):
        return self.np.arange(n)

    def to_f64(self, x):
        return self.np.asarray(x, self.np.float64)

    def cast_like(self, x, like):
        return self.np.asarray(x, like.dtype)


NUMPY = _NumPyOps()
