"""The executable form of MATH.md: config and a float64 NumPy reference.

Every backend (PyTorch, Triton, MLX, Metal) is tested against the functions here.
They are written for clarity, not speed: float64 throughout, loops over time where
the math is a recurrence. Layout everywhere is ``[B, T, H, D]``; states are
``[B, H, K, V]``; gates are passed in log space (``g = log(alpha) <= 0``).

This module imports only NumPy (and the standard library), so the CLI and both
backends can use the config without pulling in a framework.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import layer_math as lm
from .layer_math import FEATURE_MAPS, NUMPY

MODEL_TYPES = ("regla", "gla", "gsa")
ATTN_NORMS = ("rmsnorm", "layernorm", "none")
HIDDEN_ACTS = ("swish", "silu")
# fla's GatedSlotAttention normalises its output with rms_norm_linear(...) without passing its
# eps, so fla's default of 1e-5 applies whatever norm_eps says; gsa layers here do the same.
GSA_OUTPUT_NORM_EPS = 1e-5

# fla 0.6.0 builds its layers from some config fields and stores the rest unused; reading an
# fla checkpoint we drop the same ones, so the numbers are fla's. (GLA's gate normalizer and
# rank are hard-coded to 16 in fla's layer; GSA's clamp/output-gate/norm flags are not passed on.)
_FLA_IGNORED = {
    "gla": ("gate_logit_normalizer", "gate_low_rank_dim", "use_gk", "use_gv", "use_refining_gate",
            "qk_scale", "attn_norm", "softmax_layers"),
    "gsa": ("clamp_min", "clamp_max", "use_output_gate", "use_norm", "gate_low_rank_dim",
            "use_refining_gate", "qk_scale", "attn_norm", "softmax_layers"),
}
# fla's names for the maps it applies to GLA queries and keys (fla.modules.activations.ACT2FN)
# and GSA's (fla.modules.feature_map); None means no map.
_FLA_FEATURE_MAPS = {
    "gla": {None: "identity", "relu": "relu", "swish": "swish", "silu": "swish", "sigmoid": "sigmoid",
            "sqrelu": "sqrelu"},
    "gsa": {None: "swish", "swish": "swish", "relu": "relu"},  # null: older configs, the layer default
}

# Per-model-type defaults for the fields whose default depends on the layer type
# (MATH.md sections 2-4). A field left at None in ModelArgs takes these.
_TYPE_DEFAULTS = {
    "regla": dict(feature_map="safe_exp", gate_logit_normalizer=1.0, use_refining_gate=True,
                  use_output_gate=True, expand_k=0.5),
    "gla": dict(feature_map="identity", gate_logit_normalizer=16.0, use_refining_gate=False,
                use_output_gate=True, expand_k=0.5),
    "gsa": dict(feature_map="swish", gate_logit_normalizer=8.0, use_refining_gate=False,
                use_output_gate=False, expand_k=1.0),
}

class ConfigError(ValueError):
    """A config that cannot describe a model; the message names the field and the fix."""


@dataclass
class ModelArgs:
    """Every field of MATH.md with its default.

    ``attn_type`` is the layer type of every layer not in ``softmax_layers``.
    Fields left at ``None`` take the default of ``attn_type`` (regla: safe-exp map,
    refining gate, gate normalizer 1; gla: identity map, normalizer 16; gsa: swish map,
    normalizer 8, 64 slots, scale 1). ``qk_scale=None`` means the variance-reduction
    scale ``1/(e*sqrt(K*(e^2-1)))`` for safe-exp, 1 for gsa, and ``K**-0.5`` otherwise.
    """

    attn_type: str = "regla"
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    expand_k: Optional[float] = None
    expand_v: float = 1.0
    hidden_ratio: float = 4.0
    intermediate_size: Optional[int] = None
    hidden_act: str = "swish"
    feature_map: Optional[str] = None
    attn_norm: str = "rmsnorm"
    use_output_gate: Optional[bool] = None
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: Optional[float] = None
    use_refining_gate: Optional[bool] = None
    qk_scale: Optional[float] = None
    clamp_min: Optional[float] = None
    num_slots: Optional[int] = 64
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    softmax_layers: list = field(default_factory=list)
    softmax_num_heads: Optional[int] = None
    softmax_num_kv_heads: Optional[int] = None
    softmax_head_dim: Optional[int] = None        # None: hidden_size // softmax_num_heads
    softmax_qkv_bias: bool = False                # Qwen2's q/k/v biases (Llama's attention_bias: both)
    softmax_o_bias: bool = False
    rope_theta: float = 10000.0
    # transformers' rope_scaling (None, or {"rope_type": "linear" | "llama3", ...}); not named so, since
    # PretrainedConfig rewrites an attribute of that name
    softmax_rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    fuse_norm: bool = True
    elementwise_affine: bool = True
    use_short_conv: bool = False
    conv_size: int = 4
    conv_bias: bool = False
    attn_mode: str = "chunk"
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.attn_type not in MODEL_TYPES:
            raise ConfigError(
                f"unknown attention type {self.attn_type!r}: regla knows {', '.join(MODEL_TYPES)}. "
                "Set config.json's model_type (or attn_type) to one of them.")
        for name, value in _TYPE_DEFAULTS[self.attn_type].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_slots is None:  # fla's GSA: one slot per key channel of a head
            self.num_slots = self.head_k_dim
        if self.hidden_ratio is None:
            self.hidden_ratio = 4.0
        if self.softmax_num_heads is None:
            self.softmax_num_heads = self.num_heads
        if self.softmax_num_kv_heads is None:
            self.softmax_num_kv_heads = min(self.num_kv_heads, self.softmax_num_heads)
        if self.softmax_head_dim is None:
            if self.softmax_layers and self.hidden_size % self.softmax_num_heads:
                raise ConfigError(f"hidden_size ({self.hidden_size}) must divide into softmax_num_heads "
                                  f"({self.softmax_num_heads}) heads, or set softmax_head_dim")
            self.softmax_head_dim = self.hidden_size // self.softmax_num_heads
        if self.softmax_rope_scaling is not None and lm.rope_type(self.softmax_rope_scaling) == "default":
            self.softmax_rope_scaling = None  # transformers writes {"rope_type": "default"} for none
        if self.attn_mode in ("fused_chunk", "fused_recurrent"):
            self.attn_mode = "chunk"  # old fla configs; same math
        self.softmax_layers = sorted(int(i) for i in (self.softmax_layers or []))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self):
        def bad(msg):
            raise ConfigError(msg)

        if self.feature_map not in FEATURE_MAPS:
            bad(f"unknown feature_map {self.feature_map!r}; choose one of {', '.join(FEATURE_MAPS)}")
        if self.attn_norm not in ATTN_NORMS:
            bad(f"unknown attn_norm {self.attn_norm!r}; choose one of {', '.join(ATTN_NORMS)}")
        if self.feature_map == "safe_exp" and self.attn_norm == "none":
            bad("feature_map='safe_exp' needs a scale-invariant attn_norm (rmsnorm or layernorm): "
                "its causal running-max form is exact only up to a per-head scale that the norm "
                "removes (MATH.md section 2). Set attn_norm='rmsnorm' or pick another feature_map.")
        if self.attn_type == "gsa":
            if self.feature_map not in ("swish", "relu", "identity"):
                bad(f"gsa layers take feature_map swish, relu or identity, not {self.feature_map!r}")
            if self.use_refining_gate:
                bad("use_refining_gate applies to regla layers only; gsa has per-slot gates")
        if self.hidden_act not in HIDDEN_ACTS:
            bad(f"hidden_act {self.hidden_act!r} is not supported: regla's MLP (and fla's GLA/GSA MLP) is "
                "SwiGLU; use hidden_act='swish'")
        if self.conv_size < 1:
            bad(f"conv_size must be >= 1, got {self.conv_size}")
        for name in ("hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            bad(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            bad(f"hidden_size*expand_k ({self.key_dim}) and hidden_size*expand_v ({self.value_dim}) "
                f"must both divide into num_heads ({self.num_heads}) heads")
        if self.attn_type == "gsa" and self.value_dim != self.hidden_size:
            bad("gsa layers normalise over hidden_size, so expand_v must be 1")
        if self.gate_low_rank_dim < 0:
            bad("gate_low_rank_dim must be >= 0 (0 means one full-rank projection)")
        if self.gate_logit_normalizer <= 0:
            bad("gate_logit_normalizer must be positive")
        for i in self.softmax_layers:
            if not 0 <= i < self.num_hidden_layers:
                bad(f"softmax_layers index {i} is outside 0..{self.num_hidden_layers - 1}")
        if self.softmax_layers:
            if self.softmax_num_heads % self.softmax_num_kv_heads:
                bad("softmax_num_heads must be a multiple of softmax_num_kv_heads")
            if self.softmax_head_dim <= 0 or self.softmax_head_dim % 2:
                bad(f"softmax_head_dim must be positive and even for RoPE, got {self.softmax_head_dim}")
        if self.softmax_rope_scaling is not None:
            try:
                lm.rope_inv_freq(2, self.rope_theta, self.softmax_rope_scaling)
            except ValueError as e:
                bad(str(e))

    # --------------------------------------------------------------- sizes
    @property
    def key_dim(self) -> int:
        return int(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return int(self.hidden_size * self.expand_v)

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def mlp_dim(self) -> int:
        if self.intermediate_size is not None:
            return int(self.intermediate_size)
        d = int(self.hidden_size * self.hidden_ratio * 2 / 3)
        return 256 * ((d + 255) // 256)

    @property
    def scale(self) -> float:
        if self.qk_scale is not None:
            return float(self.qk_scale)
        if self.feature_map == "safe_exp":
            return safe_exp_scale(self.head_k_dim)
        if self.attn_type == "gsa":
            return 1.0
        return self.head_k_dim ** -0.5

    @property
    def norm_name(self) -> str:
        """fla names the GLA head norm ``g_norm_swish_gate`` when it is fused with the gate."""
        if self.attn_type == "gla" and self.fuse_norm and self.use_output_gate:
            return "g_norm_swish_gate"
        return "g_norm"

    def layer_type(self, i: int) -> str:
        return "softmax" if i in self.softmax_layers else self.attn_type

    # --------------------------------------------------------- (de)serialise
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        """Build from a HF-style config.json dict; legacy fla spellings are accepted.

        Our checkpoints say ``model_type: regla`` with the layer type in ``attn_type``;
        fla-hub ones say ``model_type: gla`` / ``gsa``, which becomes the attn_type.
        """
        d = dict(d)
        mt = d.pop("model_type", None)
        if mt is not None and mt != "regla":
            if mt not in MODEL_TYPES:
                raise ConfigError(
                    f"unknown model_type {mt!r}: regla loads regla, gla and gsa checkpoints "
                    "(fla-hub gla/gsa, or its own). Check the config.json of this checkpoint.")
            d = _from_fla(mt, d)
        if d.get("feature_map") is None:
            d.pop("feature_map", None)  # null means "the type's default map"
        known = {f.name for f in dataclasses.fields(cls)}
        args = {k: v for k, v in d.items() if k in known}
        return cls(**args)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "regla", **dataclasses.asdict(self)}


def _from_fla(kind: str, d: dict) -> dict:
    """An fla ``gla``/``gsa`` config.json read the way fla 0.6.0's model classes read it.

    Fields fla ignores are dropped; fields that change fla's math and that regla does not
    implement raise a ConfigError naming them (never silently different numbers).
    """
    d = {k: v for k, v in d.items() if k not in _FLA_IGNORED[kind]}
    d["attn_type"] = kind
    for old, new in (("exapnd_k", "expand_k"), ("exapnd_v", "expand_v")):
        if old in d:
            d.setdefault(new, d.pop(old))
    if d.get("attn"):
        raise ConfigError("this fla checkpoint mixes in fla's softmax attention layers (config 'attn' = "
                          f"{d['attn']}); regla cannot load fla's hybrid layers yet: use a checkpoint without 'attn'")
    if d.get("attnres_block_size") is not None:
        raise ConfigError("this fla checkpoint uses attention residuals ('attnres_block_size' = "
                          f"{d['attnres_block_size']}), which regla does not implement")
    name = d.get("feature_map")
    if name not in _FLA_FEATURE_MAPS[kind]:
        raise ConfigError(f"feature_map {name!r} of this fla {kind} checkpoint is not supported; regla reads fla's "
                          + ", ".join(str(n) for n in _FLA_FEATURE_MAPS[kind]))
    d["feature_map"] = _FLA_FEATURE_MAPS[kind][name]
    if kind == "gsa" and "num_slots" not in d:
        d["num_slots"] = 64  # GSAConfig's default (None would mean one slot per key channel)
    return d


def safe_exp_scale(head_k_dim: int) -> float:
    """MATH.md section 2, Theorem 3.1: 1 / (e * sqrt(K * (e^2 - 1)))."""
    return 1.0 / (math.e * math.sqrt(head_k_dim * (math.e ** 2 - 1.0)))


# ============================================================ GLA recurrence
def _f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def recurrent_gla(q, k, v, g, scale=None, initial_state=None, cu_seqlens=None):
    """MATH.md section 1, token by token. Returns ``(o [B,T,H,V], S [B or N,H,K,V])``.

    With ``cu_seqlens`` (B == 1) each segment starts from its own initial state
    (``initial_state[n]``, or zeros) and the returned state has one row per segment.
    """
    q, k, v, g, h0 = map(_f64, (q, k, v, g, initial_state))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        assert B == 1, "cu_seqlens needs B == 1"
        outs, states = [], []
        for n, (a, b) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
            h = None if h0 is None else h0[n:n + 1]
            o, s = recurrent_gla(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], scale, h)
            outs.append(o)
            states.append(s)
        return np.concatenate(outs, 1), np.concatenate(states, 0)
    S = np.zeros((B, H, K, V)) if h0 is None else h0.copy()
    o = np.zeros((B, T, H, V))
    for t in range(T):
        S = np.exp(g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def chunk_gla(q, k, v, g, scale=None, initial_state=None, chunk_size=64):
    """MATH.md section 1, chunked. Any T (the last chunk may be short), any chunk size.

    Every exponent is a difference ``b_i - b_j`` with ``j <= i`` or ``b_last - b_j``,
    so all are ``<= 0``: safe for any finite log gate.
    """
    q, k, v, g, h0 = map(_f64, (q, k, v, g, initial_state))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = np.zeros((B, H, K, V)) if h0 is None else h0.copy()
    o = np.zeros((B, T, H, V))
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        qc, kc, vc = q[:, s:e], k[:, s:e], v[:, s:e]
        b = np.cumsum(g[:, s:e], axis=1)  # [B,C,H,K]
        C = e - s
        # A[i,j] = sum_k q_ik k_jk exp(b_ik - b_jk), j <= i: exponents masked before exp
        diff = b[:, :, None] - b[:, None, :]  # [B,Ci,Cj,H,K]
        causal = np.tril(np.ones((C, C), dtype=bool))[None, :, :, None, None]
        decay = np.exp(np.where(causal, diff, -np.inf))
        A = np.einsum("bihk,bjhk,bijhk->bhij", qc, kc, decay)
        intra = np.einsum("bhij,bjhv->bihv", A, vc)
        inter = np.einsum("bihk,bhkv->bihv", qc * np.exp(b), S)
        o[:, s:e] = scale * (inter + intra)
        b_last = b[:, -1]  # [B,H,K]
        S = np.exp(b_last)[..., None] * S + np.einsum(
            "bjhk,bjhv->bhkv", kc * np.exp(b_last[:, None] - b), vc)
    return o, S


# ============================================================ feature maps and gates
# The elementwise math lives in regla.layer_math, shared with both backends; these are its
# float64 NumPy entry points.
def feature_map(x, name):
    """The per-token maps (queries always; keys for every map except safe-exp)."""
    return lm.feature_map(NUMPY, _f64(x), name)


def safe_exp_keys_causal(k, m_prev=None):
    """Causal safe-exp key map (MATH.md section 2): ``(phi_k, gate_term [B,T,H], m_last [B,H])``;
    see ``regla.layer_math.safe_exp_keys``."""
    return lm.safe_exp_keys(NUMPY, _f64(k), None if m_prev is None else _f64(m_prev))


def safe_exp_keys_global(k):
    """The paper's literal key map: one max over all positions and channels per head."""
    k = _f64(k)
    M = k.max(axis=(1, 3), keepdims=True)
    return np.exp(k - M)


def logsigmoid(x):
    return NUMPY.log_sigmoid(_f64(x))


def refined_log_gate(log_f, z_r):
    """log alpha of ReGLA's refining gate (MATH.md section 2.4); see
    ``regla.layer_math.refined_log_gate`` for its two exact branches."""
    return lm.refined_log_gate(NUMPY, _f64(log_f), _f64(z_r))


# ============================================================ norms and layers
def rms_norm(x, w=None, eps=1e-6):
    x = _f64(x)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * _f64(w)


def layer_norm(x, w=None, b=None, eps=1e-6):
    x = _f64(x)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if w is not None:
        y = y * _f64(w)
    if b is not None:
        y = y + _f64(b)
    return y


def silu(x):
    x = _f64(x)
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-_f64(x)))


def linear(x, w, b=None):
    y = _f64(x) @ _f64(w).T
    return y if b is None else y + _f64(b)


def gate_proj(x, w, name):
    """The low-rank (or, with rank 0, full-rank) gate projection: fla's ``gk_proj``."""
    if f"{name}.0.weight" in w:
        return linear(linear(x, w[f"{name}.0.weight"]), w[f"{name}.1.weight"], w.get(f"{name}.1.bias"))
    return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _heads(x, d):
    return x.reshape(*x.shape[:-1], -1, d)


def _repeat_kv(x, groups):
    return x if groups == 1 else np.repeat(x, groups, axis=2)


def head_norm(o, w, cfg: ModelArgs, eps=None):
    """The per-head norm of step 6 (weights of head dim, shared by every head)."""
    eps = cfg.norm_eps if eps is None else eps
    name = cfg.norm_name
    if cfg.attn_norm == "rmsnorm":
        return rms_norm(o, w.get(f"{name}.weight"), eps)
    if cfg.attn_norm == "layernorm":
        return layer_norm(o, w.get(f"{name}.weight"), w.get(f"{name}.bias"), eps)
    return o


def _projections(x, w, cfg: ModelArgs, conv_state):
    """q, k, v of a linear layer [B,T,width], through fla's short convolutions when the config
    has them; returns them with the convolutions' new states (an empty tuple without)."""
    q, k, v = (linear(x, w[f"{n}_proj.weight"]) for n in "qkv")
    if not cfg.use_short_conv:
        return q, k, v, ()
    conv_state = conv_state or (None, None, None)
    out = [lm.short_conv(NUMPY, t, _f64(w[f"{n}_conv1d.weight"]), _f64(w.get(f"{n}_conv1d.bias")), st)
           for n, t, st in zip("qkv", (q, k, v), conv_state)]
    return (*(y for y, _ in out), tuple(st for _, st in out))


def linear_attention(x, w, cfg: ModelArgs, state=None, key_map="causal", norm_eps=None,
                     chunk_size=None):
    """A regla or gla layer (MATH.md sections 2-3) from a dict of its weights.

    ``w`` holds the layer's attention weights without the ``model.layers.{i}.attn.`` prefix.
    ``state`` is ``(S [B,H,K,V], m [B,Hkv])`` (m is None unless the key map is safe-exp),
    followed by the three short-convolution states ``[B,W-1,width]`` of q, k, v when the
    config has them. ``key_map="global"`` runs the paper's literal whole-sequence key max
    instead of the causal running max (no state in or out then). Returns ``(y, state)``.
    """
    x = _f64(x)
    B, T, _ = x.shape
    Kd, Vd, G = cfg.head_k_dim, cfg.head_v_dim, cfg.num_kv_groups
    S0, m0, *conv0 = (None, None) if state is None else state
    q, k, v, conv = _projections(x, w, cfg, conv0)
    q, k, v = _heads(q, Kd), _heads(k, Kd), _heads(v, Vd)
    z_r = _heads(gate_proj(x, w, "gr_proj"), Kd) if cfg.use_refining_gate else None
    g = lm.log_forget_gate(NUMPY, _heads(gate_proj(x, w, "gk_proj"), Kd), z_r, cfg)
    m_last = None
    q = feature_map(q, cfg.feature_map)
    if cfg.feature_map == "safe_exp":
        if key_map == "global":
            assert state is None, "the literal key map looks at the whole sequence: no state"
            k = safe_exp_keys_global(k)
        else:
            k, term, m_last = safe_exp_keys_causal(k, m0)
            g = g + term[..., None]
    else:
        k = feature_map(k, cfg.feature_map)
    k, v, g = (_repeat_kv(t, G) for t in (k, v, g))
    if chunk_size is None:
        o, S = recurrent_gla(q, k, v, g, cfg.scale, S0)
    else:
        o, S = chunk_gla(q, k, v, g, cfg.scale, S0, chunk_size)
    o = head_norm(o, w, cfg, norm_eps)
    o = o.reshape(B, T, -1)
    if cfg.use_output_gate:
        o = o * silu(linear(x, w["g_proj.weight"]))
    return linear(o, w["o_proj.weight"]), (S, m_last, *conv)


def recurrent_gsa(q, k, v, s, g, scale, Kt0=None, Vt0=None):
    """GSA's slot recurrence (MATH.md section 4), token by token: q, k [B,T,H,K], v [B,T,H,V],
    slot weights s and log slot gates g [B,T,H,m]; slot keys ``Kt [B,H,K,m]`` and values
    ``Vt [B,H,m,V]`` (zeros when not given). Returns ``(o [B,T,H,V], Kt, Vt)``."""
    q, k, v, s, g = (_f64(t) for t in (q, k, v, s, g))
    B, T, H, Kd = q.shape
    M, Vd = s.shape[-1], v.shape[-1]
    Kt = np.zeros((B, H, Kd, M)) if Kt0 is None else _f64(Kt0).copy()
    Vt = np.zeros((B, H, M, Vd)) if Vt0 is None else _f64(Vt0).copy()
    o = np.zeros((B, T, H, Vd))
    for t in range(T):
        a = np.exp(g[:, t])  # [B,H,M]
        Kt = Kt * a[:, :, None, :] + k[:, t, :, :, None] * s[:, t, :, None, :]
        Vt = Vt * a[..., None] + s[:, t, :, :, None] * v[:, t, :, None, :]
        scores = scale * np.einsum("bhk,bhkm->bhm", q[:, t], Kt)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o[:, t] = np.einsum("bhm,bhmv->bhv", p, Vt)
    return o, Kt, Vt


def gsa_attention(x, w, cfg: ModelArgs, state=None):
    """A gsa layer (MATH.md section 4, fla's GatedSlotAttention) from its weights.

    ``state`` is ``(Kt [B,H,K,m], Vt [B,H,m,V])``: the slot keys (key-major, as fla keeps
    them) and slot values, followed by the short-convolution states when the config has
    them. Returns ``(y, state)``.
    """
    x = _f64(x)
    B, T, _ = x.shape
    Kd, Vd, G, M = cfg.head_k_dim, cfg.head_v_dim, cfg.num_kv_groups, cfg.num_slots
    Kt0, Vt0, *conv0 = (None, None) if state is None else state
    q, k, v, conv = _projections(x, w, cfg, conv0)
    q = feature_map(_heads(q, Kd), cfg.feature_map)
    k = feature_map(_heads(k, Kd), cfg.feature_map)
    v = silu(_heads(v, Vd))
    g, s = lm.slot_gate(NUMPY, _heads(linear(x, w["f_proj.weight"]), M), cfg.gate_logit_normalizer)
    k, v, g, s = (_repeat_kv(t, G) for t in (k, v, g, s))
    o, Kt, Vt = recurrent_gsa(q, k, v, s, g, cfg.scale, Kt0, Vt0)
    o = silu(o.reshape(B, T, -1))
    o = rms_norm(o, w.get("g_norm.weight"), GSA_OUTPUT_NORM_EPS)
    return linear(o, w["o_proj.weight"]), (Kt, Vt, *conv)


def rope(x, positions, theta, scaling=None):
    """Llama's rotary embedding (rotate-half form) on ``[B,T,H,D]``; ``scaling`` is the config's
    ``softmax_rope_scaling`` (see ``regla.layer_math.rope_inv_freq``)."""
    D = x.shape[-1]
    inv = np.asarray(lm.rope_inv_freq(D, theta, scaling), dtype=np.float64)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None]  # [T, D/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[None, :, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[None, :, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def softmax_attention(x, w, cfg: ModelArgs, state=None):
    """Causal softmax attention with RoPE and grouped kv heads (hybrid stacks).

    ``state`` is ``(keys, values)`` [B,T',Hkv,D] after RoPE. Returns ``(y, (keys, values))``.
    """
    x = _f64(x)
    B, T, _ = x.shape
    D = cfg.softmax_head_dim
    q, k, v = (_heads(linear(x, w[f"{n}_proj.weight"], w.get(f"{n}_proj.bias")), D) for n in "qkv")
    past = 0 if state is None else state[0].shape[1]
    pos = np.arange(past, past + T)
    q, k = (rope(t, pos, cfg.rope_theta, cfg.softmax_rope_scaling) for t in (q, k))
    if state is not None:
        k = np.concatenate([state[0], k], 1)
        v = np.concatenate([state[1], v], 1)
    G = cfg.softmax_num_heads // cfg.softmax_num_kv_heads
    kr, vr = _repeat_kv(k, G), _repeat_kv(v, G)
    s = np.einsum("bihd,bjhd->bhij", q, kr) * D ** -0.5
    mask = (np.arange(past + T)[None, :] <= pos[:, None])  # [T, T']
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhij,bjhd->bihd", p, vr).reshape(B, T, -1)
    return linear(o, w["o_proj.weight"], w.get("o_proj.bias")), (k, v)


def mlp(x, w):
    return linear(silu(linear(x, w["gate_proj.weight"])) * linear(x, w["up_proj.weight"]),
                  w["down_proj.weight"])


def sub_dict(weights, prefix):
    n = len(prefix)
    return {k[n:]: v for k, v in weights.items() if k.startswith(prefix)}


def model_forward(weights, cfg: ModelArgs, input_ids, cache=None):
    """Whole-model logits from the HF-format state dict (NumPy arrays).

    ``cache`` is a list with one entry per layer (the state each layer function returns),
    or None. Returns ``(logits [B,T,vocab], cache)``.
    """
    ids = np.asarray(input_ids)
    h = _f64(weights["model.embeddings.weight"])[ids]
    new_cache = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        st = None if cache is None else cache[i]
        a = rms_norm(h, weights[p + "attn_norm.weight"], cfg.norm_eps)
        aw = sub_dict(weights, p + "attn.")
        kind = cfg.layer_type(i)
        if kind == "softmax":
            y, st = softmax_attention(a, aw, cfg, st)
        elif kind == "gsa":
            y, st = gsa_attention(a, aw, cfg, st)
        else:
            y, st = linear_attention(a, aw, cfg, st)
        new_cache.append(st)
        h = h + y
        h = h + mlp(rms_norm(h, weights[p + "mlp_norm.weight"], cfg.norm_eps), sub_dict(weights, p + "mlp."))
    h = rms_norm(h, weights["model.norm.weight"], cfg.norm_eps)
    head = weights["model.embeddings.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]
    return linear(h, head), new_cache


# ============================================================ weights
def expected_shapes(cfg: ModelArgs) -> dict[str, tuple]:
    """Every tensor a checkpoint of this config holds, with its shape (HF/fla names)."""
    d, V = cfg.hidden_size, cfg.vocab_size
    Kkv = cfg.key_dim // cfg.num_kv_groups
    Vkv = cfg.value_dim // cfg.num_kv_groups
    r = cfg.gate_low_rank_dim
    shapes = {"model.embeddings.weight": (V, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)

    def low_rank(prefix, out):
        if r > 0:
            return {f"{prefix}.0.weight": (r, d), f"{prefix}.1.weight": (out, r), f"{prefix}.1.bias": (out,)}
        return {f"{prefix}.weight": (out, d), f"{prefix}.bias": (out,)}

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "attn."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "mlp_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.mlp_dim, d)
        shapes[p + "mlp.up_proj.weight"] = (cfg.mlp_dim, d)
        shapes[p + "mlp.down_proj.weight"] = (d, cfg.mlp_dim)
        kind = cfg.layer_type(i)
        if kind == "softmax":
            D = cfg.softmax_head_dim
            shapes[a + "q_proj.weight"] = (cfg.softmax_num_heads * D, d)
            shapes[a + "k_proj.weight"] = (cfg.softmax_num_kv_heads * D, d)
            shapes[a + "v_proj.weight"] = (cfg.softmax_num_kv_heads * D, d)
            shapes[a + "o_proj.weight"] = (d, cfg.softmax_num_heads * D)
            if cfg.softmax_qkv_bias:
                shapes[a + "q_proj.bias"] = (cfg.softmax_num_heads * D,)
                shapes[a + "k_proj.bias"] = (cfg.softmax_num_kv_heads * D,)
                shapes[a + "v_proj.bias"] = (cfg.softmax_num_kv_heads * D,)
            if cfg.softmax_o_bias:
                shapes[a + "o_proj.bias"] = (d,)
            continue
        shapes[a + "q_proj.weight"] = (cfg.key_dim, d)
        shapes[a + "k_proj.weight"] = (Kkv, d)
        shapes[a + "v_proj.weight"] = (Vkv, d)
        shapes[a + "o_proj.weight"] = (d, cfg.value_dim)
        if cfg.use_short_conv:  # depthwise Conv1d weights, torch layout [width, 1, kernel]
            for n, width in (("q", cfg.key_dim), ("k", Kkv), ("v", Vkv)):
                shapes[a + f"{n}_conv1d.weight"] = (width, 1, cfg.conv_size)
                if cfg.conv_bias:
                    shapes[a + f"{n}_conv1d.bias"] = (width,)
        if kind == "gsa":
            shapes[a + "f_proj.weight"] = (cfg.num_kv_heads * cfg.num_slots, d)
            if cfg.elementwise_affine:
                shapes[a + "g_norm.weight"] = (d,)
            continue
        shapes.update({a + k: s for k, s in low_rank("gk_proj", Kkv).items()})
        if cfg.use_refining_gate:
            shapes.update({a + k: s for k, s in low_rank("gr_proj", Kkv).items()})
        if cfg.use_output_gate:
            shapes[a + "g_proj.weight"] = (cfg.value_dim, d)
        if cfg.attn_norm != "none" and cfg.elementwise_affine:
            shapes[a + cfg.norm_name + ".weight"] = (cfg.head_v_dim,)
            if cfg.attn_norm == "layernorm":
                shapes[a + cfg.norm_name + ".bias"] = (cfg.head_v_dim,)
    return shapes


def check_weights(weights: dict, cfg: ModelArgs) -> None:
    """Raise ConfigError naming every missing, unexpected or mis-shaped tensor."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    wrong = sorted(k for k in set(want) & set(weights) if tuple(weights[k].shape) != tuple(want[k]))
    if not (missing or extra or wrong):
        return
    lines = []
    if missing:
        lines.append(f"missing {len(missing)}: " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    if extra:
        lines.append(f"unexpected {len(extra)}: " + ", ".join(extra[:6]) + (" ..." if len(extra) > 6 else ""))
    for k in wrong[:6]:
        lines.append(f"{k}: checkpoint has shape {tuple(weights[k].shape)}, config expects {tuple(want[k])}")
    raise ConfigError("the weights do not match the config (" + cfg.attn_type + "):\n  " + "\n  ".join(lines)
                      + "\nCheck that config.json belongs to these weights (hidden_size, num_heads, "
                        "expand_k/expand_v, gate_low_rank_dim, num_hidden_layers, softmax_layers).")


def init_weights(cfg: ModelArgs, seed: int = 0, std: float | None = None) -> dict[str, np.ndarray]:
    """Random float32 weights of the right names and shapes (norm weights near 1)."""
    rng = np.random.default_rng(seed)
    std = cfg.initializer_range if std is None else std
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1 and ("norm" in name):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif len(shape) == 1:
            out[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        elif "conv1d" in name:  # a short kernel: weights of order one keep its output in scale
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        else:
            out[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out
