"""The Metal kernels of metal/*.metal against the float64 spec, run by the CPU emulator.

``regla_mlx.kernels.metal_chunk_gla`` / ``metal_recurrent_gla`` run their real launch code
with ``mx.fast.metal_kernel`` replaced by the emulator (tests/metal_emu), which compiles the
exact source MLX would hand to Metal with g++ and runs every GPU thread as a fiber with real
barriers and simdgroup exchanges. Needs MLX and a C++17 compiler (g++) on Linux; skipped
elsewhere. tests/test_ops_metal_emulated.py runs the same kernels through regla_mlx.ops.
"""

import shutil
import sys

import numpy as np
import pytest

from regla import spec
from conftest import make_inputs, rel_rms

pytest.importorskip("mlx.core", reason="MLX is not installed (pip install '.[mlx]')")

if not sys.platform.startswith("linux") or shutil.which("g++") is None:  # pragma: no cover
    # The fiber switching (ucontext + _setjmp) is written for glibc; on a Mac run the
    # real kernels instead: pytest -m metal.
    pytest.skip("the Metal emulator runs on Linux with g++", allow_module_level=True)

from metal_emu import emulated_gla, round_to  # noqa: E402

TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 5e-3}


def check(kind, B, T, H, K, V, gates, with_state, dtype="float32", g_dtype=None, seed=0):
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, gates=gates, seed=seed, with_state=with_state)
    g_dtype = g_dtype or dtype
    # The reference sees the values the kernel sees.
    q, k, v = (round_to(x, dtype) for x in (q, k, v))
    g = round_to(g, g_dtype)
    scale = K ** -0.5
    o, s = emulated_gla(kind, q, k, v, g, scale, h0, dtypes=(dtype, dtype, dtype, g_dtype), seed=seed)
    ro, rs = spec.recurrent_gla(q, k, v, g, scale, h0)
    eo, es = rel_rms(o, ro), rel_rms(s, rs)
    assert o.shape == ro.shape and s.shape == rs.shape
    assert np.isfinite(np.asarray(o, np.float64)).all() and np.isfinite(s).all()
    assert eo <= TOL[dtype], f"{kind} o: rel rms {eo:.3g} > {TOL[dtype]}"
    assert es <= TOL[dtype], f"{kind} state: rel rms {es:.3g} > {TOL[dtype]}"
    return eo, es


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gates", ["mixed", "weak", "strong"])
def test_fp32_lengths_gates(kind, T, with_state, gates):
    check(kind, 2, T, 2, 64, 64, gates, with_state)


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize(
    "K,V,T,B,H",
    [
        (128, 128, 300, 2, 2),
        (128, 128, 65, 1, 2),
        (64, 128, 65, 2, 1),
        (128, 64, 63, 1, 1),
        (256, 256, 300, 1, 1),
        (256, 64, 65, 2, 1),
        (64, 256, 1, 1, 2),
        (256, 512, 65, 1, 1),  # GLA 1.3B heads
    ],
)
def test_fp32_head_dims(kind, K, V, T, B, H):
    check(kind, B, T, H, K, V, "mixed", True)


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("T", [1, 65, 300])
@pytest.mark.parametrize("with_state", [False, True])
def test_f16(kind, T, with_state):
    check(kind, 2, T, 2, 64, 64, "mixed", with_state, dtype="float16")


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("T,gates", [(63, "mixed"), (300, "weak"), (64, "strong")])
def test_bf16(kind, T, gates):
    check(kind, 1, T, 2, 128, 128, gates, True, dtype="bfloat16")


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_bf16_inputs_fp32_gate(kind):
    check(kind, 2, 65, 1, 128, 64, "mixed", True, dtype="bfloat16", g_dtype="float32")


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_f16_head_dim_256(kind):
    check(kind, 1, 65, 1, 256, 256, "mixed", True, dtype="float16")


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_varlen_one_launch(kind):
    """Sequences of 0, 1, 63, 64, 65 and 130 rows packed in one launch, each with its
    own initial state, against the spec sequence by sequence."""
    lens = [0, 1, 63, 64, 65, 130]
    cu = np.concatenate([[0], np.cumsum(lens)]).tolist()
    q, k, v, g, _ = make_inputs(1, cu[-1], 2, 64, 64, "mixed", seed=12, with_state=False)
    h0 = np.random.default_rng(13).standard_normal((len(lens), 2, 64, 64)).astype(np.float32)
    o, s = emulated_gla(kind, q, k, v, g, None, h0, cu_seqlens=cu)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0, cu_seqlens=cu)
    assert rel_rms(o, ro) <= 1e-5 and rel_rms(s, rs) <= 1e-5


def test_chunk_matches_recurrent_kernel():
    """Prefill with one kernel, decode with the other: the states hand over."""
    q, k, v, g, h0 = make_inputs(1, 70, 2, 64, 128, gates="mixed", seed=3)
    o1, s1 = emulated_gla("chunk", q[:, :67], k[:, :67], v[:, :67], g[:, :67], None, h0)
    o2, s2 = emulated_gla("recurrent", q[:, 67:], k[:, 67:], v[:, 67:], g[:, 67:], None, s1)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0)
    assert rel_rms(np.concatenate([o1, o2], 1), ro) <= 1e-5
    assert rel_rms(s2, rs) <= 1e-5


def test_gate_extremes_are_finite():
    """Gates of -1e4 on every other channel (state wiped each step) next to gates of exactly 0."""
    B, T, H, K, V = 1, 97, 1, 64, 64
    q, k, v, _, h0 = make_inputs(B, T, H, K, V, seed=5)
    g = np.zeros((B, T, H, K), np.float32)
    g[..., ::2] = -1e4
    for kind in ("chunk", "recurrent"):
        o, s = emulated_gla(kind, q, k, v, g, None, h0)
        ro, rs = spec.recurrent_gla(q, k, v, g, None, h0)
        assert np.isfinite(o).all() and np.isfinite(s).all()
        assert rel_rms(o, ro) <= 1e-5 and rel_rms(s, rs) <= 1e-5


@pytest.mark.parametrize("seed", [1, 2])
def test_result_independent_of_interleaving(seed):
    """Another random interleaving of threads and simdgroups gives the same bits."""
    q, k, v, g, h0 = make_inputs(1, 65, 1, 64, 64, seed=7)
    a = emulated_gla("chunk", q, k, v, g, None, h0, seed=0)
    b = emulated_gla("chunk", q, k, v, g, None, h0, seed=seed)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
