"""The float64 reference itself: chunked == recurrent, the gate and key-map identities, config."""

import json
import math

import numpy as np
import pytest

from regla import spec
from conftest import make_inputs


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("C", [16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(T, C, with_state):
    q, k, v, g, h0 = make_inputs(2, T, 2, 8, 6, "mixed", seed=T + C, with_state=with_state)
    o1, s1 = spec.recurrent_gla(q, k, v, g, None, h0)
    o2, s2 = spec.chunk_gla(q, k, v, g, None, h0, chunk_size=C)
    assert np.abs(o1 - o2).max() <= 1e-10 * max(1.0, np.abs(o1).max())
    assert np.abs(s1 - s2).max() <= 1e-10 * max(1.0, np.abs(s1).max())


def test_chunked_never_overflows_with_strongest_gates():
    q, k, v, g, h0 = make_inputs(1, 130, 1, 4, 4, "strong", seed=1)
    g[:] = -1e4
    o, s = spec.chunk_gla(q, k, v, g, None, h0, chunk_size=64)
    assert np.isfinite(o).all() and np.isfinite(s).all()
    # with every gate at -1e4 the state is just the last token's outer product
    np.testing.assert_allclose(s[0, 0], np.outer(k[0, -1, 0], v[0, -1, 0]), atol=1e-12)


def test_varlen_is_segments_one_by_one():
    q, k, v, g, _ = make_inputs(1, 50, 2, 4, 3, seed=2, with_state=False)
    cu = [0, 7, 30, 50]
    h0 = np.random.default_rng(0).standard_normal((3, 2, 4, 3))
    o, s = spec.recurrent_gla(q, k, v, g, None, h0, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        on, sn = spec.recurrent_gla(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], None, h0[n:n + 1])
        np.testing.assert_allclose(o[:, a:b], on)
        np.testing.assert_allclose(s[n:n + 1], sn)


def test_refined_gate_matches_definition_to_high_precision():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 1200  # f can be e^-1000 ~ 1e-435: 1-(1-f)^2 needs more digits than that
    worst = 0.0
    for lf in -np.logspace(-9, 3, 25):
        for zr in np.linspace(-30, 30, 7):
            f = mpmath.exp(mpmath.mpf(lf))
            r = 1 / (1 + mpmath.exp(-mpmath.mpf(zr)))
            alpha = r * (1 - (1 - f) ** 2) + (1 - r) * f ** 2
            ref = float(mpmath.log(alpha))
            got = float(spec.refined_log_gate(lf, zr))
            worst = max(worst, abs(got - ref) / abs(ref))
    assert worst < 1e-13


def test_refined_gate_is_in_the_open_unit_interval_and_fixes_saturation():
    lf = np.linspace(-20, -1e-6, 200)
    for zr in (-5.0, 0.0, 5.0):
        la = spec.refined_log_gate(lf, zr)
        assert (la < 0).all() and np.isfinite(la).all()
    # r -> 1 pushes alpha above f, r -> 0 below it (the refining gate's two directions)
    assert (spec.refined_log_gate(lf, 20.0) > lf).all()
    assert (spec.refined_log_gate(lf, -20.0) < lf).all()


def _tiny(attn_type="regla", **kw):
    base = dict(attn_type=attn_type, vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=2, num_slots=8)
    base.update(kw)
    return spec.ModelArgs(**base)


def test_causal_key_map_equals_papers_form_up_to_norm_eps():
    cfg = _tiny()
    w = spec.sub_dict(spec.init_weights(cfg, 3, std=0.5), "model.layers.0.attn.")
    x = np.random.default_rng(3).standard_normal((2, 50, 32))
    x[:, 40] *= 6.0  # a late large key: the literal form's early outputs shrink by exp(-(M - m_t))
    y_causal, _ = spec.linear_attention(x, w, cfg, norm_eps=0.0)
    y_paper, _ = spec.linear_attention(x, w, cfg, key_map="global", norm_eps=0.0)
    assert np.abs(y_causal - y_paper).max() <= 1e-9 * np.abs(y_paper).max()


def test_causal_key_map_state_carries_running_max():
    cfg = _tiny()
    w = spec.sub_dict(spec.init_weights(cfg, 4, std=0.5), "model.layers.0.attn.")
    x = np.random.default_rng(4).standard_normal((1, 30, 32))
    y, _ = spec.linear_attention(x, w, cfg)
    y1, st = spec.linear_attention(x[:, :17], w, cfg)
    y2, _ = spec.linear_attention(x[:, 17:], w, cfg, state=st)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), y, rtol=1e-10, atol=1e-12)


def test_chunked_layer_equals_recurrent_layer():
    cfg = _tiny()
    w = spec.sub_dict(spec.init_weights(cfg, 5, std=0.5), "model.layers.0.attn.")
    x = np.random.default_rng(5).standard_normal((1, 70, 32))
    y1, (s1, _) = spec.linear_attention(x, w, cfg)
    y2, (s2, _) = spec.linear_attention(x, w, cfg, chunk_size=16)
    np.testing.assert_allclose(y1, y2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("attn_type", ["regla", "gla", "gsa"])
def test_model_decode_equals_full_forward(attn_type):
    cfg = _tiny(attn_type, softmax_layers=[1])
    w = spec.init_weights(cfg, 6, std=0.3)
    ids = np.random.default_rng(6).integers(0, 40, (2, 12))
    full, _ = spec.model_forward(w, cfg, ids)
    part, cache = spec.model_forward(w, cfg, ids[:, :5])
    outs = [part]
    for t in range(5, 12):
        o, cache = spec.model_forward(w, cfg, ids[:, t:t + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-10, atol=1e-12)


def test_safe_exp_scale_is_variance_reduction():
    assert spec.safe_exp_scale(64) == pytest.approx(1 / (math.e * math.sqrt(64 * (math.e ** 2 - 1))))
    assert _tiny().scale == pytest.approx(spec.safe_exp_scale(8))
    assert _tiny("gla").scale == pytest.approx(8 ** -0.5)
    assert _tiny("gsa").scale == 1.0


def test_type_defaults():
    r, g, s = _tiny("regla"), _tiny("gla"), _tiny("gsa")
    assert (r.feature_map, r.gate_logit_normalizer, r.use_refining_gate) == ("safe_exp", 1.0, True)
    assert (g.feature_map, g.gate_logit_normalizer, g.use_refining_gate) == ("identity", 16.0, False)
    assert (s.feature_map, s.gate_logit_normalizer, s.num_slots) == ("swish", 8.0, 8)


def test_config_round_trips_through_json():
    cfg = _tiny(softmax_layers=[0], qk_scale=0.3, attn_norm="layernorm", gate_low_rank_dim=0)
    back = spec.ModelArgs.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_fla_legacy_config_is_read():
    d = {"model_type": "gsa", "hidden_size": 64, "num_heads": 4, "exapnd_k": 0.5, "exapnd_v": 1,
         "attn_mode": "fused_chunk", "rms_norm_eps": 1e-5, "share_conv_kernel": True, "feature_map": None,
         "num_hidden_layers": 2, "vocab_size": 100}
    cfg = spec.ModelArgs.from_dict(d)
    assert (cfg.attn_type, cfg.expand_k, cfg.attn_mode, cfg.feature_map) == ("gsa", 0.5, "chunk", "swish")


@pytest.mark.parametrize("kw, words", [
    (dict(feature_map="cosine"), "unknown feature_map"),
    (dict(attn_norm="batchnorm"), "unknown attn_norm"),
    (dict(num_heads=3), "num_heads"),
    (dict(num_kv_heads=3, num_heads=4), "multiple of num_kv_heads"),
    (dict(attn_norm="none"), "scale-invariant"),
    (dict(softmax_layers=[5]), "softmax_layers index 5"),
    (dict(attn_type="mamba"), "unknown attention type"),
])
def test_bad_config_is_rejected_clearly(kw, words):
    with pytest.raises(spec.ConfigError, match=words):
        _tiny(**kw)


def test_unknown_model_type_in_json_is_rejected():
    with pytest.raises(spec.ConfigError, match="unknown model_type 'llama'"):
        spec.ModelArgs.from_dict({"model_type": "llama", "hidden_size": 32, "num_heads": 2})


def test_weights_that_do_not_fit_are_named():
    cfg = _tiny()
    w = spec.init_weights(cfg)
    spec.check_weights(w, cfg)
    w["model.layers.1.attn.q_proj.weight"] = np.zeros((8, 32), np.float32)
    del w["model.norm.weight"]
    w["model.layers.0.attn.extra.weight"] = np.zeros(1)
    with pytest.raises(spec.ConfigError) as e:
        spec.check_weights(w, cfg)
    msg = str(e.value)
    assert "model.norm.weight" in msg and "extra.weight" in msg and "(8, 32)" in msg and "(16, 32)" in msg
