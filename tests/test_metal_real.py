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


@pytest.mark.metal
@needs_metal
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_metal_varlen_one_launch(kind):
    lens = [0, 1, 63, 64, 65, 300]
    cu = np.concatenate([[0], np.cumsum(lens)]).tolist()
    q, k, v, g, _ = make_inputs(1, cu[-1], 2, 128, 128, "mixed", seed=12, with_state=False)
    h0 = np.random.default_rng(13).standard_normal((len(lens), 2, 128, 128)).astype(np.float32)
    o, s = FUNCS[kind](*(mx.array(x) for x in (q, k, v, g)), 128 ** -0.5, mx.array(h0), True, cu)
    ro, rs = spec.recurrent_gla(q, k, v, g, 128 ** -0.5, h0, cu_seqlens=cu)
    assert rel_rms(np.array(o), ro) <= 1e-5 and rel_rms(np.array(s), rs) <= 1e-5


@pytest.mark.metal
@needs_metal
@pytest.mark.parametrize("T", [64, 100, 1000])
def test_metal_spiky_gates(T):
    """Issue #20: gates of -1e4 at every 13th token between weak ones, fp32 <= 1e-5."""
    from test_ops_mlx import spiky_gates

    q, k, v, _, h0 = make_inputs(1, T, 2, 128, 128, seed=T)
    g = spiky_gates(1, T, 2, 128, seed=T)
    o, s = kernels.metal_chunk_gla(*(mx.array(x) for x in (q, k, v, g)), 128 ** -0.5, mx.array(h0), True)
    ro, rs = spec.recurrent_gla(q, k, v, g, 128 ** -0.5, h0)
    assert rel_rms(np.array(o), ro) <= 1e-5 and rel_rms(np.array(s), rs) <= 1e-5


@pytest.mark.metal
@needs_metal
def test_metal_ops_gradient_and_mixed_dtypes():
    """Through regla_mlx.ops on the GPU: bf16 activations with an f32 gate (what the models
    pass), then the same kernel with f32 inputs (MLX before 0.32 cached a kernel without
    its input dtypes), and a gradient through the custom_function."""
    from regla_mlx import ops

    q, k, v, g, h0 = make_inputs(1, 130, 2, 64, 128, "mixed", seed=14)
    for dt in (mx.bfloat16, mx.float32):
        xs = [mx.array(x).astype(dt) for x in (q, k, v)] + [mx.array(g)]
        o, s = ops.chunk_gla(*xs, None, mx.array(h0), True)
        ro, rs = spec.recurrent_gla(*(np.array(x.astype(mx.float32)) for x in xs), None, h0)
        tol = 1e-5 if dt == mx.float32 else 5e-3
        assert rel_rms(np.array(o.astype(mx.float32)), ro) <= tol and rel_rms(np.array(s), rs) <= tol
    grads = mx.grad(lambda q: ops.chunk_gla(q, *(mx.array(x) for x in (k, v, g)))[0].sum())(mx.array(q))
    assert np.isfinite(np.array(grads)).all()


def test_real_launch_path_traces(monkeypatch, tmp_path, capfd):
    """Runs regla_mlx.kernels' own launch code up to the kernel calls (exported, not
    executed) and checks the kernels MLX would compile: every kernel of each op, the
    template instances, the input types (mixed here), the scale as a constant."""
    if not HAS_METAL:
        monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    kernels._build.cache_clear()
    B, T, H, K, V = 1, 7, 2, 128, 64
    real = mx.fast.metal_kernel

    def verbose_kernel(**kw):
        inner = real(**kw)
        return lambda **call: inner(**call, verbose=True)

    monkeypatch.setattr(mx.fast, "metal_kernel", verbose_kernel)

    def f(q, k, v, g, h0):
        o1, s1 = kernels.metal_chunk_gla(q, k, v, g, 0.25, h0, True)
        o2, s2 = kernels.metal_recurrent_gla(q, k, v, g, 0.25, h0, True)
        return o1, s1, o2, s2

    args = [mx.zeros((B, T, H, K), mx.bfloat16), mx.zeros((B, T, H, K), mx.bfloat16),
            mx.zeros((B, T, H, V), mx.bfloat16), mx.zeros((B, T, H, K), mx.float32), mx.zeros((B, H, K, V))]
    try:
        mx.export_function(str(tmp_path / "k.mlxfn"), f, *args)
    except Exception as e:  # pragma: no cover - depends on the MLX version
        if HAS_METAL:
            raise
        pytest.skip(f"this MLX cannot trace metal_kernel without Metal: {e}")
    finally:
        kernels._build.cache_clear()
    out = capfd.readouterr().out
    # (the bounds of one sequence would have fewer than 8 elements, which MLX would pass in
    # the constant address space, a "c" after their type; kernels pads them)
    bf, f32, i32c = "bfloat16_t", "float", "int32_t"
    names = {
        "chunk_h": f"custom_kernel_regla_gla_chunk_h_{bf}_{bf}_{f32}_{f32}_{i32c}_{i32c}_{f32}_{f32}",
        "chunk_a": f"custom_kernel_regla_gla_chunk_a_{bf}_{bf}_{f32}_{i32c}_{f32}",
        "chunk_o": f"custom_kernel_regla_gla_chunk_o__{bf}_{bf}_{bf}_{f32}_{f32}_{f32}_{i32c}_floats_{bf}",
        "recurrent": f"custom_kernel_regla_gla_recurrent_fwd__{bf}_{K}_{bf}_{bf}_{bf}_{f32}_{f32}_{i32c}_floats_{bf}_{f32}",
    }
    for kind, name in names.items():
        assert f"[[kernel]] void {name}(" in out, kind
    assert f"decltype({names['chunk_o']}<{bf}>)" in out
    assert f"decltype({names['recurrent']}<{bf}, {K}>)" in out
    assert "const constant float& scale [[buffer(" in out
    assert "const constant int* q_shape [[buffer(1)]]" in out


def test_sources_found_next_to_the_module_first(tmp_path):
    """A folder holding kernels.py and a metal/ folder (a converted model that carries its
    kernels) reads its own sources; from the checkout, the checkout's metal/ comes before an
    installed regla.metal."""
    import importlib.util
    import shutil
    from pathlib import Path

    model = tmp_path / "model"
    (model / "metal").mkdir(parents=True)
    shutil.copy(kernels.__file__, model / "kernels.py")
    (model / "metal" / "gla_common.h").write_text("// the bundled header\n")
    # a metal/ folder one level up (where a checkout keeps it) comes second
    (tmp_path / "metal").mkdir()
    (tmp_path / "metal" / "gla_common.h").write_text("// the header one level up\n")
    (tmp_path / "metal" / "gla_chunk_h.metal").write_text("// a kernel one level up\n")
    spec_ = importlib.util.spec_from_file_location("bundled_kernels", model / "kernels.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    assert mod.read_source("gla_common.h") == "// the bundled header\n"
    assert mod.read_source("gla_chunk_h.metal") == "// a kernel one level up\n"
    with pytest.raises(FileNotFoundError, match="gla_nothing.metal"):
        mod.read_source("gla_nothing.metal")
    checkout = Path(kernels.__file__).resolve().parent.parent / "metal"
    assert kernels.read_source("gla_chunk_o.metal") == (checkout / "gla_chunk_o.metal").read_text()
