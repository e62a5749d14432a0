"""regla_mlx.ops (pure MLX here; Metal on a Mac) against regla.spec, and its gradient."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install '.[mlx]')")

from regla import spec  # noqa: E402
from regla_mlx.ops import chunk_gated, chunk_gla, chunk_gsa, recurrent_gla  # noqa: E402
from conftest import make_inputs, rel_rms  # noqa: E402

OPS = {"chunk": chunk_gla, "recurrent": recurrent_gla}
TOL = {"float32": 1e-5, "bfloat16": 5e-3}


def np_(x):
    return np.array(x.astype(mx.float32))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gates", ["weak", "strong", "mixed"])
@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_op_matches_spec(op, dtype, gates, T):
    q, k, v, g, h0 = make_inputs(2, T, 2, 16, 8, gates, seed=T)
    dt = getattr(mx, dtype)
    qm, km, vm = (mx.array(x).astype(dt) for x in (q, k, v))
    # the reference sees the same (rounded) inputs
    ro, rs = spec.recurrent_gla(np_(qm), np_(km), np_(vm), g, None, h0)
    o, s = OPS[op](qm, km, vm, mx.array(g), None, mx.array(h0), True)
    assert o.dtype == dt and s.dtype == mx.float32
    assert np.isfinite(np_(o)).all() and np.isfinite(np_(s)).all()
    assert rel_rms(np_(o), ro) <= TOL[dtype]
    assert rel_rms(np_(s), rs) <= TOL[dtype]


def spiky_gates(B, T, H, K, seed=0):
    """Issue #20's case: a log gate of -1e4 at every 13th token, weak gates (-1e-3..0) between.
    A chunked form that takes differences of in-chunk cumulative sums is ~5e-4 off here."""
    rng = np.random.default_rng(seed)
    g = -1e-3 * rng.random((B, T, H, K))
    g[:, ::13] = -1e4
    return g.astype(np.float32)


@pytest.mark.parametrize("T", [64, 100, 1000])
def test_chunk_fp32_spiky_gates(T):
    q, k, v, _, h0 = make_inputs(1, T, 2, 16, 8, seed=T)
    g = spiky_gates(1, T, 2, 16, seed=T)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0)
    o, s = chunk_gla(*(mx.array(x) for x in (q, k, v, g)), None, mx.array(h0), True)
    assert rel_rms(np_(o), ro) <= 1e-5 and rel_rms(np_(s), rs) <= 1e-5


def test_value_gated_chunk_spiky_gates():
    """The value-side gate (GSA's path) under the same gates, against a float64 loop."""
    q, k, v, _, _ = make_inputs(1, 100, 1, 8, 16, seed=2, with_state=False)
    gv = spiky_gates(1, 100, 1, 16, seed=2)
    h0 = np.random.default_rng(3).standard_normal((1, 1, 8, 16))
    S, ro = h0[0, 0].copy(), []
    for t in range(100):
        S = S * np.exp(gv[0, t, 0].astype(np.float64))[None, :] + np.outer(k[0, t, 0], v[0, t, 0])
        ro.append(0.5 * q[0, t, 0].astype(np.float64) @ S)
    o, s = chunk_gated(*(mx.array(x) for x in (q, k, v)), None, mx.array(gv), 0.5,
                       mx.array(h0.astype(np.float32)), True)
    assert rel_rms(np_(o)[0, :, 0], np.array(ro)) <= 1e-5 and rel_rms(np_(s)[0, 0], S) <= 1e-5


@pytest.mark.parametrize("op", list(OPS))
def test_varlen_equals_sequences_one_by_one(op):
    q, k, v, g, _ = make_inputs(1, 70, 2, 8, 4, seed=9, with_state=False)
    cu = [0, 5, 64, 70]
    h0 = np.random.default_rng(0).standard_normal((3, 2, 8, 4)).astype(np.float32)
    o, s = OPS[op](*(mx.array(x) for x in (q, k, v, g)), None, mx.array(h0), True, cu_seqlens=cu)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0, cu_seqlens=cu)
    assert rel_rms(np_(o), ro) <= 1e-5 and rel_rms(np_(s), rs) <= 1e-5


@pytest.mark.parametrize("op", list(OPS))
def test_grad_matches_finite_differences_of_spec(op):
    q, k, v, g, h0 = make_inputs(1, 9, 1, 3, 2, "mixed", seed=11)
    g = np.maximum(g, -3.0)  # keep the finite differences well conditioned
    rng = np.random.default_rng(12)
    wo, ws = rng.standard_normal((1, 9, 1, 2)), rng.standard_normal((1, 1, 3, 2))

    def spec_loss(xs):
        o, s = spec.recurrent_gla(*xs, 0.7, None)
        return float((o * wo).sum() + (s * ws).sum())

    xs = [x.astype(np.float64) for x in (q, k, v, g)]
    h0 = None

    def mlx_loss(q, k, v, g):
        o, s = OPS[op](q, k, v, g, 0.7, None, True)
        return (o * mx.array(wo, dtype=mx.float32)).sum() + (s * mx.array(ws, dtype=mx.float32)).sum()

    grads = mx.grad(mlx_loss, argnums=(0, 1, 2, 3))(*(mx.array(x.astype(np.float32)) for x in xs))
    eps = 1e-6
    for i, name in enumerate("qkvg"):
        fd = np.zeros_like(xs[i])
        for idx in np.ndindex(xs[i].shape):
            plus = [x.copy() for x in xs]
            minus = [x.copy() for x in xs]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            fd[idx] = (spec_loss(plus) - spec_loss(minus)) / (2 * eps)
        assert rel_rms(np.array(grads[i]), fd) <= 1e-4, name


def test_bad_shapes_are_named():
    q, k, v, g, _ = make_inputs(1, 10, 2, 4, 4, with_state=False)
    a = [mx.array(x) for x in (q, k, v, g)]
    with pytest.raises(ValueError, match="k and g must have q's shape"):
        chunk_gla(a[0], a[1][..., :3], a[2], a[3])
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gla(*a, initial_state=mx.zeros((1, 2, 4, 5)))


def test_gsa_matches_torch_free_reference():
    rng = np.random.default_rng(13)
    B, T, H, K, V, M = 1, 70, 2, 8, 6, 5
    q, k = rng.standard_normal((2, B, T, H, K)).astype(np.float32)
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    g = (spec.logsigmoid(rng.standard_normal((B, T, H, M))) / 8).astype(np.float32)
    s = (1 - np.exp(g)).astype(np.float32)
    args = [mx.array(x) for x in (q, k, v, s, g)]
    o1, (hk1, hv1) = chunk_gsa(*args, 1.0, None, True, chunked=True)
    o2, (hk2, hv2) = chunk_gsa(*args, 1.0, None, True, chunked=False)
    assert rel_rms(np_(o1), np_(o2).astype(np.float64)) <= 1e-5
    assert rel_rms(np_(hk1), np_(hk2).astype(np.float64)) <= 1e-5
