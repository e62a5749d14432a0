"""regla_torch.ops (the pure-torch paths on CPU) against regla.spec and torch autograd."""

import numpy as np
import pytest
import torch

from regla import spec
from regla_torch.ops import chunk_gla, chunk_gsa, decode_step_, fused_recurrent_gla, naive_recurrent_gla
from conftest import make_inputs, rel_rms

OPS = {"chunk": chunk_gla, "recurrent": fused_recurrent_gla}
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def bf16_round(x):
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gates", ["weak", "strong", "mixed"])
@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_op_matches_spec(op, dtype, gates, T):
    q, k, v, g, h0 = make_inputs(2, T, 2, 16, 8, gates, seed=T)
    if dtype == torch.bfloat16:  # the reference sees the same (rounded) inputs
        q, k, v = bf16_round(q), bf16_round(k), bf16_round(v)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0)
    t = lambda x: torch.from_numpy(x)
    o, s = OPS[op](t(q).to(dtype), t(k).to(dtype), t(v).to(dtype), t(g), None, t(h0), True)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_rms(o.float(), ro) <= TOL[dtype]
    assert rel_rms(s, rs) <= TOL[dtype]


@pytest.mark.parametrize("gates", ["weak", "mixed"])
def test_decode_step_updates_the_state_in_place(gates):
    q, k, v, g, h0 = make_inputs(2, 5, 3, 16, 8, gates, seed=4)
    t = lambda x: torch.from_numpy(x)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0)
    state = t(h0).float().clone()
    ptr = state.data_ptr()
    for i in range(5):
        o = decode_step_(t(q[:, i:i + 1]), t(k[:, i:i + 1]), t(v[:, i:i + 1]), t(g[:, i:i + 1]), state)
        assert o.shape == (2, 1, 3, 8) and rel_rms(o[:, 0], ro[:, i]) <= 1e-5
    assert state.data_ptr() == ptr and rel_rms(state, rs) <= 1e-5
    with pytest.raises(ValueError, match="decode_step_ needs"):
        decode_step_(t(q[:, :2]), t(k[:, :2]), t(v[:, :2]), t(g[:, :2]), state)


def test_final_state_only_when_asked():
    q, k, v, g, _ = make_inputs(1, 10, 1, 4, 4, with_state=False)
    for op in OPS.values():
        o, s = op(*(torch.from_numpy(x) for x in (q, k, v, g)))
        assert s is None and o.shape == (1, 10, 1, 4)


@pytest.mark.parametrize("gates", ["weak", "mixed"])
def test_chunk_gradients_match_autograd_through_naive_recurrence(gates):
    q, k, v, g, h0 = make_inputs(1, 37, 2, 8, 4, gates, seed=7)
    args = [torch.from_numpy(x).double().requires_grad_() for x in (q, k, v, g, h0)]
    w = torch.randn(1, 37, 2, 4, dtype=torch.float64)
    ws = torch.randn(1, 2, 8, 4, dtype=torch.float64)

    def loss(fn):
        o, s = fn(args[0], args[1], args[2], args[3], 0.3, args[4], True)
        return (o.double() * w).sum() + (s.double() * ws).sum()

    ga = torch.autograd.grad(loss(chunk_gla), args)
    gb = torch.autograd.grad(loss(naive_recurrent_gla), args)
    for name, a, b in zip("q k v g h0".split(), ga, gb):
        assert torch.isfinite(a).all(), name
        assert rel_rms(a, b.numpy()) <= 1e-5, name


def test_strong_gates_give_finite_gradients_in_bf16():
    q, k, v, g, h0 = make_inputs(1, 300, 2, 16, 16, "strong", seed=8)
    args = [torch.from_numpy(x).to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    gg = torch.from_numpy(g).requires_grad_()
    o, s = chunk_gla(*args, gg, None, torch.from_numpy(h0), True)
    (o.float().sum() + s.sum()).backward()
    for t in (*args, gg):
        assert torch.isfinite(t.grad.float()).all()


@pytest.mark.parametrize("op", list(OPS))
def test_varlen_equals_sequences_one_by_one(op):
    q, k, v, g, _ = make_inputs(1, 70, 2, 8, 4, seed=9, with_state=False)
    cu = torch.tensor([0, 5, 64, 70])
    h0 = torch.randn(3, 2, 8, 4)
    t = lambda x: torch.from_numpy(x)
    o, s = OPS[op](t(q), t(k), t(v), t(g), None, h0, True, cu_seqlens=cu)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0.numpy(), cu_seqlens=cu.tolist())
    assert rel_rms(o, ro) <= 1e-5 and rel_rms(s, rs) <= 1e-5


def test_bad_shapes_are_named():
    q, k, v, g, _ = make_inputs(1, 10, 2, 4, 4, with_state=False)
    t = lambda x: torch.from_numpy(x)
    with pytest.raises(ValueError, match="k and g must have q's shape"):
        chunk_gla(t(q), t(k)[..., :3], t(v), t(g))
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gla(t(q), t(k), t(v), t(g), initial_state=torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_gla(t(q), t(k), t(v), t(g), cu_seqlens=torch.tensor([0, 4, 9]))


@pytest.mark.parametrize("chunked", [True, False])
def test_gsa_op_matches_spec_layer_recurrence(chunked):
    rng = np.random.default_rng(10)
    B, T, H, K, V, M = 1, 70, 2, 8, 6, 5
    q, k = rng.standard_normal((2, B, T, H, K))
    v = rng.standard_normal((B, T, H, V))
    g = spec.logsigmoid(rng.standard_normal((B, T, H, M))) / 8
    s = 1 - np.exp(g)
    # spec form: Kt [K,m], Vt [m,V] updated per token, from a carried-in state
    Kt0, Vt0 = rng.standard_normal((B, H, K, M)), rng.standard_normal((B, H, M, V))
    Kt, Vt = Kt0, Vt0
    ref = np.zeros((B, T, H, V))
    for t in range(T):
        a = np.exp(g[:, t])
        Kt = Kt * a[:, :, None, :] + k[:, t, :, :, None] * s[:, t, :, None, :]
        Vt = Vt * a[..., None] + s[:, t, :, :, None] * v[:, t, :, None, :]
        sc = np.einsum("bhk,bhkm->bhm", q[:, t], Kt)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        ref[:, t] = np.einsum("bhm,bhmv->bhv", p / p.sum(-1, keepdims=True), Vt)
    T_ = lambda x: torch.from_numpy(x).float()
    o, (hk, hv) = chunk_gsa(T_(q), T_(k), T_(v), T_(s), T_(g), 1.0, (T_(Kt0), T_(Vt0)), True, chunked=chunked)
    assert rel_rms(o, ref) <= 1e-5 and rel_rms(hk, Kt) <= 1e-5 and rel_rms(hv, Vt) <= 1e-5


def test_packed_training_path_equals_sequences_one_by_one_with_gradients():
    # no initial or final state: chunk_gla takes the one-pass masked path (sequences starting
    # mid-chunk, a one-token sequence, one longer than a chunk)
    q, k, v, g, _ = make_inputs(1, 70, 2, 8, 4, "mixed", seed=14, with_state=False)
    cu = torch.tensor([0, 5, 6, 40, 70])
    args = [torch.from_numpy(x).requires_grad_() for x in (q, k, v, g)]
    o, s = chunk_gla(*args, 0.5, cu_seqlens=cu)
    assert s is None
    ref = torch.cat([naive_recurrent_gla(*(a[:, i:j] for a in args), 0.5)[0]
                     for i, j in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert rel_rms(o.detach(), ref.detach().numpy()) <= 1e-5
    w = torch.randn_like(o)
    ga = torch.autograd.grad((o * w).sum(), args)
    gb = torch.autograd.grad((ref * w).sum(), args)
    for name, a, b in zip("qkvg", ga, gb):
        assert rel_rms(a, b.numpy()) <= 1e-5, name


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_sizes_agree_with_spec(chunk_size):
    from regla_torch.ops import chunk_gated

    q, k, v, g, h0 = make_inputs(1, 150, 2, 8, 4, "mixed", seed=15)
    cu = torch.tensor([0, 40, 41, 150])
    t = lambda x: torch.from_numpy(x)
    o, s = chunk_gated(t(q), t(k), t(v), t(g), None, None, t(h0), True, chunk_size=chunk_size)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0)
    assert rel_rms(o, ro) <= 1e-5 and rel_rms(s, rs) <= 1e-5
    o, _ = chunk_gated(t(q), t(k), t(v), t(g), chunk_size=chunk_size, segment_ids=torch.repeat_interleave(
        torch.arange(3), cu[1:] - cu[:-1]))
    ro, _ = spec.recurrent_gla(q, k, v, g, None, None, cu_seqlens=cu.tolist())
    assert rel_rms(o, ro) <= 1e-5


def strong_every_13th(T, seed, H=2, K=16, V=8):
    """Log gates of -1e4 on every channel at every 13th token, weak ones (-1e-3..0) between, and
    an initial state: after a strong gate the chunk's cumsum is ~-1e4 (fp32 ulp ~1e-3) while
    the decays between the later tokens are ~1, the case where a difference of two cumsums
    loses them (issue #20)."""
    q, k, v, g, h0 = make_inputs(1, T, H, K, V, "weak", seed=seed)
    g[:, 12::13] = -1e4
    return q, k, v, g, h0


@pytest.mark.parametrize("T", [64, 100, 1000])
def test_chunk_fp32_exact_under_minus_1e4_gates_among_weak_ones(T):
    q, k, v, g, h0 = strong_every_13th(T, seed=T)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0)
    t = lambda x: torch.from_numpy(x)
    o, s = chunk_gla(t(q), t(k), t(v), t(g), None, t(h0), True)
    assert rel_rms(o, ro) <= 1e-5 and rel_rms(s, rs) <= 1e-5
    # the packed training path (segment ids, no state) too
    cu = torch.tensor([0, 7, T])
    o, _ = chunk_gla(t(q), t(k), t(v), t(g), cu_seqlens=cu)
    ro, _ = spec.recurrent_gla(q, k, v, g, None, None, cu_seqlens=cu.tolist())
    assert rel_rms(o, ro) <= 1e-5


def test_chunk_fp32_gradients_exact_under_minus_1e4_gates_among_weak_ones():
    from regla_torch.ops.naive import recurrent_gla_reference
    q, k, v, g, h0 = strong_every_13th(100, seed=5)
    gen = torch.Generator().manual_seed(6)
    do, dht = torch.randn(1, 100, 2, 8, generator=gen), torch.randn(1, 2, 16, 8, generator=gen)
    args = [torch.from_numpy(x).requires_grad_() for x in (q, k, v, g, h0)]
    o, s = chunk_gla(*args[:4], None, args[4], True)
    ((o * do).sum() + (s * dht).sum()).backward()
    ref = recurrent_gla_reference(*(torch.from_numpy(x) for x in (q, k, v, g, h0)), do, dht)
    for name, a, r in zip("o s dq dk dv dg dh0".split(), [o, s] + [x.grad for x in args], ref):
        assert rel_rms(a.detach(), r.numpy()) <= 1e-5, name


def test_gsa_chunked_exact_under_minus_1e4_slot_gates():
    # the value-side gate of GSA's first pass takes the same partial sums
    q, k, _, g, _ = strong_every_13th(100, seed=7, K=8, V=8)
    rng = np.random.default_rng(8)
    v = rng.standard_normal((1, 100, 2, 6)).astype(np.float32)
    s = 1 - np.exp(np.maximum(g, -30))
    T_ = lambda x: torch.from_numpy(x)
    a, (ak, av) = chunk_gsa(T_(q), T_(k), T_(v), T_(s), T_(g), 1.0, None, True, chunked=True)
    b, (bk, bv) = chunk_gsa(*(T_(x).double() for x in (q, k, v, s, g)), 1.0, None, True, chunked=False)
    assert rel_rms(a, b.numpy()) <= 1e-5 and rel_rms(ak, bk.numpy()) <= 1e-5 and rel_rms(av, bv.numpy()) <= 1e-5


def test_float64_reference_gradients_match_autograd():
    from regla_torch.ops.naive import recurrent_gla_reference
    q, k, v, g, h0 = make_inputs(1, 70, 2, 8, 4, "mixed", seed=16)
    cu = [0, 30, 31, 70]
    h0 = np.concatenate([h0] * 3)
    gen = torch.Generator().manual_seed(17)
    do, dht = torch.randn(1, 70, 2, 4, generator=gen).double(), torch.randn(3, 2, 8, 4, generator=gen).double()
    args = [torch.from_numpy(x).double().requires_grad_() for x in (q, k, v, g, h0)]
    outs = [naive_recurrent_gla(*(a[:, i:j] for a in args[:4]), None, args[4][n:n + 1], True)
            for n, (i, j) in enumerate(zip(cu[:-1], cu[1:]))]
    o, s = torch.cat([x[0] for x in outs], 1), torch.cat([x[1] for x in outs], 0)
    # naive_recurrent_gla computes in fp32: the comparison is at that precision
    ((o * do).sum() + (s * dht).sum()).backward()
    ref = recurrent_gla_reference(*(a.detach() for a in args), do, dht, cu_seqlens=cu, every=16)
    for name, a, r in zip("o s dq dk dv dg dh0".split(), [o, s] + [x.grad for x in args], ref):
        assert r.dtype == torch.float64
        assert rel_rms(a.detach(), r.numpy()) <= 1e-6, name
