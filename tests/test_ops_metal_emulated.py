"""``regla_mlx.ops`` with its Metal path, on Linux: the ops run their real code (the
``custom_function`` wrapper and its vjp, ``cu_seqlens``, ``regla_mlx.kernels``' launches)
while ``mx.fast.metal_kernel`` is replaced by the CPU emulator of tests/metal_emu, which
compiles the kernel text a Mac would compile. Head dims that take the kernels (K in
64/128/256, V a multiple of 64); checked against the float64 ``regla.spec``.

What this does not show: speed, and anything the emulator does not model (see
metal/README.md); the same checks run on Apple hardware with ``pytest -m metal``.
"""

import shutil
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install '.[mlx]')")

if not sys.platform.startswith("linux") or shutil.which("g++") is None:  # pragma: no cover
    pytest.skip("the Metal emulator runs on Linux with g++ (on a Mac: pytest -m metal)", allow_module_level=True)

from regla import spec  # noqa: E402
from regla_mlx import ops  # noqa: E402
from conftest import make_inputs, rel_rms  # noqa: E402
from test_ops_mlx import spiky_gates  # noqa: E402
import metal_emu  # noqa: E402

OPS = {"chunk": ops.chunk_gla, "recurrent": ops.recurrent_gla}
TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 5e-3}
# dtypes of (q, k, v, g); the output takes q's
DTYPES = {
    "float32": ("float32",) * 4,
    "float16": ("float16",) * 4,
    "bfloat16": ("bfloat16",) * 4,
    "bf16_f32_gate": ("bfloat16", "bfloat16", "bfloat16", "float32"),  # what the models pass
    "mixed": ("float16", "bfloat16", "float32", "float32"),
}


@pytest.fixture
def metal():
    """Routes regla_mlx.ops through the emulated kernels; yields a function that says how
    many kernel launches have run since the fixture started."""
    with metal_emu.emulated_metal():
        start = metal_emu.EmulatedMetalKernel.calls
        yield lambda: metal_emu.EmulatedMetalKernel.calls - start


def np_(x):
    return np.array(x.astype(mx.float32))


def run(op, q, k, v, g, h0, dtypes=DTYPES["float32"], cu=None, final=True):
    """The op on MLX arrays of ``dtypes`` and the spec on the same (rounded) values."""
    xs = [mx.array(x).astype(getattr(mx, d)) for x, d in zip((q, k, v, g), dtypes)]
    h0m = None if h0 is None else mx.array(h0)
    o, s = OPS[op](*xs, None, h0m, final, cu_seqlens=cu)
    assert o.dtype == xs[0].dtype
    ro, rs = spec.recurrent_gla(*(np_(x) for x in xs), None, h0, cu_seqlens=cu)
    if not final:
        assert s is None
        return rel_rms(np_(o), ro), None
    assert s.dtype == mx.float32 and s.shape == rs.shape
    return rel_rms(np_(o), ro), rel_rms(np.array(s), rs)


def check(op, metal, *args, tol=1e-5, **kw):
    """Runs ``run`` and checks the errors; returns the number of kernel launches."""
    before = metal()
    eo, es = run(op, *args, **kw)
    assert metal() > before, "the op did not launch a (emulated) Metal kernel"
    assert eo <= tol and (es is None or es <= tol), (eo, es)
    return metal() - before


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_dtypes(op, dtypes, metal):
    q, k, v, g, h0 = make_inputs(2, 65, 1, 64, 64, "mixed", seed=1)
    check(op, metal, q, k, v, g, h0, dtypes=DTYPES[dtypes], tol=TOL[DTYPES[dtypes][0]])


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("K,V,T,gates", [(128, 128, 65, "strong"), (256, 64, 33, "mixed"), (64, 128, 130, "weak"),
                                         (256, 128, 1, "mixed")])
def test_head_dims(op, K, V, T, gates, metal):
    q, k, v, g, h0 = make_inputs(1, T, 2, K, V, gates, seed=K + V + T)
    check(op, metal, q, k, v, g, h0)


@pytest.mark.parametrize("op", list(OPS))
def test_varlen(op, metal):
    """Packed sequences (one of length 0) with their own initial states, in one launch
    per kernel (three for the chunked op, one token by token)."""
    q, k, v, g, _ = make_inputs(1, 100, 2, 64, 64, "mixed", seed=3, with_state=False)
    cu = [0, 5, 70, 70, 100]
    h0 = np.random.default_rng(4).standard_normal((4, 2, 64, 64)).astype(np.float32)
    launches = {"chunk": 3, "recurrent": 1}[op]
    assert check(op, metal, q, k, v, g, h0, cu=cu) == launches
    assert check(op, metal, q, k, v, g, None, cu=mx.array(cu), dtypes=DTYPES["bf16_f32_gate"], tol=5e-3) == launches


@pytest.mark.parametrize("op", list(OPS))
def test_no_initial_or_final_state(op, metal):
    q, k, v, g, _ = make_inputs(2, 40, 1, 64, 64, "weak", seed=5, with_state=False)
    check(op, metal, q, k, v, g, None, final=False)


@pytest.mark.parametrize("op", list(OPS))
def test_zero_keys_and_gates(op, metal):
    """Positions with k = 0 and g = 0 (how padding is made exact) neither write nor decay."""
    q, k, v, g, h0 = make_inputs(1, 70, 1, 64, 64, "mixed", seed=6)
    k[:, 20:45] = 0.0
    g[:, 20:45] = 0.0
    check(op, metal, q, k, v, g, h0)


@pytest.mark.parametrize("T", [64, 100, 1000])
def test_spiky_gates_fp32(T, metal):
    """fp32 <= 1e-5 with gates of -1e4 between weak ones (MATH.md: any finite gate)."""
    q, k, v, _, h0 = make_inputs(1, T, 1, 64, 64, seed=T)
    g = spiky_gates(1, T, 1, 64, seed=T)
    check("chunk", metal, q, k, v, g, h0)


@pytest.mark.parametrize("gates", ["strong", "weak", "mixed"])
def test_gate_kinds_fp32(gates, metal):
    q, k, v, g, h0 = make_inputs(1, 100, 1, 64, 64, gates, seed=7)
    check("chunk", metal, q, k, v, g, h0)


def test_chunk_then_recurrent_hand_over(metal):
    """Prefill with the chunk kernel, decode with the recurrent one, as the model does."""
    q, k, v, g, h0 = make_inputs(1, 70, 2, 64, 128, "mixed", seed=8)
    a = [mx.array(x) for x in (q, k, v, g)]
    o1, s1 = ops.chunk_gla(*(x[:, :67] for x in a), None, mx.array(h0), True)
    o2, s2 = ops.recurrent_gla(*(x[:, 67:] for x in a), None, s1, True)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0)
    assert rel_rms(np_(mx.concatenate([o1, o2], 1)), ro) <= 1e-5
    assert rel_rms(np.array(s2), rs) <= 1e-5


@pytest.mark.parametrize("op", list(OPS))
def test_gradient_through_the_metal_forward(op, metal, monkeypatch):
    """The custom_function's vjp (the pure path's) gives the pure path's gradient, for
    every input including the initial state; the forward it wraps is the kernel's."""
    q, k, v, g, h0 = make_inputs(1, 33, 1, 64, 64, "mixed", seed=9)
    rng = np.random.default_rng(10)
    wo = mx.array(rng.standard_normal((1, 33, 1, 64)).astype(np.float32))
    ws = mx.array(rng.standard_normal((1, 1, 64, 64)).astype(np.float32))
    args = [mx.array(x) for x in (q, k, v, g, h0)]

    def loss(q, k, v, g, h0):
        o, s = OPS[op](q, k, v, g, None, h0, True)
        return (o * wo).sum() + (s * ws).sum()

    before = metal()
    val, grads = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    mx.eval(val, grads)
    assert metal() > before
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    val_p, grads_p = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    assert abs(val.item() - val_p.item()) <= 1e-4 * abs(val_p.item())
    for a, b in zip(grads, grads_p):
        assert rel_rms(np.array(a), np.array(b)) <= 1e-5


def test_mlx_before_0_32_falls_back(metal, monkeypatch):
    """MLX before 0.32 reused a compiled custom kernel for other input dtypes: with it the
    ops take the plain-MLX path (still right), and the kernels refuse with the fix."""
    from regla_mlx import kernels

    monkeypatch.setattr(mx, "__version__", "0.31.2")
    q, k, v, g, h0 = make_inputs(1, 20, 1, 64, 64, "mixed", seed=15)
    before = metal()
    eo, es = run("chunk", q, k, v, g, h0)
    assert metal() == before and eo <= 1e-5 and es <= 1e-5
    with pytest.raises(RuntimeError, match="MLX >= 0.32"):
        kernels.metal_chunk_gla(*(mx.array(x) for x in (q, k, v, g)), 0.125)
