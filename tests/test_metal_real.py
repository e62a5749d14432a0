"""The real Metal kernels (regla_mlx.kernels) against the float64 spec.

The tests marked ``metal`` need Apple Silicon; run them with ``pytest -m metal``. Elsewhere
they are skipped. The last test runs everywhere MLX is installed: it traces the real
launch path for export, which MLX allows without a GPU, and checks the call it records.
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install '.[mlx]')")

from regla import spec  # noqa: E402
from regla_mlx import kernels  # noqa: E402
from conftest import make_inputs, rel_rms  # noqa: E402

HAS_METAL = mx.metal.is_available()
needs_metal = pytest.mark.skipif(
    not HAS_METAL, reason="needs Metal (Apple Silicon); this machine has no Metal device, "
    "the same kernels are checked by the CPU emulator in test_metal_emulated.py")

TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 5e-3}
FUNCS = {"chunk": kernels.metal_chunk_gla, "recurrent": kernels.metal_recurrent_gla}


def _run(kind, B, T, H, K, V, gates, with_state, dtype, seed=0):
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, gates=gates, seed=seed, with_state=with_state)
    mdt = getattr(mx, dtype)
    qa, ka, va = (mx.array(x).astype(mdt) for x in (q, k, v))
    ga = mx.array(g)
    # The reference sees the rounded inputs the kernel sees.
    q, k, v = (np.array(x.astype(mx.float32)) for x in (qa, ka, va))
    h0a = None if h0 is None else mx.array(h0)
    o, s = FUNCS[kind](qa, ka, va, ga, K ** -0.5, h0a, True)
    mx.eval(o, s)
    assert o.dtype == mdt and s.dtype == mx.float32
    ro, rs = spec.recurrent_gla(q, k, v, g, K ** -0.5, h0)
    return rel_rms(np.array(o.astype(mx.float32)), ro), rel_rms(np.array(s), rs)


@pytest.mark.metal
@needs_metal
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gates", ["mixed", "weak", "strong"])
def test_metal_fp32(kind, T, with_state, gates):
    eo, es = _run(kind, 2, T, 2, 64, 64, gates, with_state, "float32")
    assert eo <= TOL["float32"] and es <= TOL["float32"], (eo, es)


@pytest.mark.metal
@needs_metal
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("K,V", [(64, 128), (128, 64), (128, 128), (256, 256), (256, 128)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_metal_head_dims_dtypes(kind, K, V, dtype):
    eo, es = _run(kind, 2, 300, 2, K, V, "mixed", True, dtype)
    assert eo <= TOL[dtype] and es <= TOL[dtype], (eo, es)


@pytest.mark.metal
@needs_metal
def test_metal_final_state_optional():
    q, k, v, g, _ = make_inputs(1, 10, 1, 64, 64)
    o, s = kernels.metal_chunk_gla(*(mx.array(x) for x in (q, k, v, g)), 0.125)
    assert s is None and o.shape == (1, 10, 1, 64)


def test_kernels_module_refuses_without_metal():
    if HAS_METAL:
        pytest.skip("Metal is available here")
    q = mx.zeros((1, 4, 1, 64))
    with pytest.raises(RuntimeError, match="Metal"):
        kernels.metal_chunk_gla(q, q, q, q, 0.125)


@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_real_launch_path_traces(kind, monkeypatch, tmp_path, capfd):
    """Runs regla_mlx.kernels' own launch code up to the kernel call (exported, not
    executed) and checks the kernel MLX would compile: the template instance, the input
    types and the attributes match what the emulator compiled."""
    if not HAS_METAL:
        monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    kernels._build.cache_clear()
    B, T, H, K, V = 1, 7, 2, 128, 64

    def f(q, k, v, g, h0):
        o, s = FUNCS[kind](q, k, v, g, 0.25, h0, True)
        return o, s

    def verbose_build(kind_):
        k_ = kernels.kernel_spec(kind_, "float32", 64, 64)
        inner = mx.fast.metal_kernel(name=k_["name"], input_names=k_["input_names"],
                                     output_names=k_["output_names"], source=k_["source"],
                                     header=k_["header"])
        return lambda **kw: inner(**kw, verbose=True)

    monkeypatch.setattr(kernels, "_build", verbose_build)
    args = [mx.zeros((B, T, H, K), mx.bfloat16), mx.zeros((B, T, H, K), mx.bfloat16),
            mx.zeros((B, T, H, V), mx.bfloat16), mx.zeros((B, T, H, K), mx.float32), mx.zeros((B, H, K, V))]
    try:
        mx.export_function(str(tmp_path / "k.mlxfn"), f, *args)
    except Exception as e:  # pragma: no cover - depends on the MLX version
        if HAS_METAL:
            raise
        pytest.skip(f"this MLX cannot trace metal_kernel without Metal: {e}")
    out = capfd.readouterr().out
    name = f"custom_kernel_regla_gla_{kind}_fwd__bfloat16_t_{K}_{V}_bfloat16_t_bfloat16_t_bfloat16_t_float_float_floats_bfloat16_t_float"
    assert f"[[kernel]] void {name}(" in out
    assert f"decltype({name}<bfloat16_t, {K}, {V}>)" in out
    assert "const constant float& scale [[buffer(" in out
    assert "const constant int* q_shape [[buffer(1)]]" in out
