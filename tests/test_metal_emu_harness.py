"""Tests of the Metal emulator itself: it must reproduce MLX's generated source, and it must
catch the bugs that only show on a GPU (a missing barrier, a wrong simdgroup tile, a
reduction that does not reach all lanes, a barrier not all threads reach)."""

import re
import shutil
import sys

import numpy as np
import pytest

from regla import spec
from conftest import make_inputs, rel_rms

if not sys.platform.startswith("linux") or shutil.which("g++") is None:  # pragma: no cover
    # The fiber switching (ucontext + _setjmp) is written for glibc; on a Mac run the
    # real kernels instead: pytest -m metal.
    pytest.skip("the Metal emulator runs on Linux with g++", allow_module_level=True)

import metal_emu  # noqa: E402
from metal_emu import EmulationError, emulated_chunk_gla, emulated_recurrent_gla  # noqa: E402

BARRIER = re.compile(r"(threadgroup|simdgroup)_barrier\(mem_flags::mem_threadgroup\);")
CHUNK_SRC = metal_emu._kernels().kernel_spec("chunk", "float32", 64, 64)["source"]
N_BARRIERS = len(BARRIER.findall(CHUNK_SRC))


@pytest.fixture(scope="module")
def data():
    q, k, v, g, h0 = make_inputs(1, 65, 1, 64, 64, gates="mixed", seed=11)
    return (q, k, v, g, h0), spec.recurrent_gla(q, k, v, g, None, h0)


def caught(f, args, ref, transform, seed=0):
    """True when the mutated kernel gives a visibly wrong result or the emulator
    reports an error."""
    try:
        o, s = f(*args[:4], None, args[4], source_transform=transform, seed=seed)
    except EmulationError:
        return True
    o = np.asarray(o, np.float64)
    if not (np.isfinite(o).all() and np.isfinite(s).all()):
        return True
    return rel_rms(o, ref[0]) > 1e-3 or rel_rms(s, ref[1]) > 1e-3


def test_unmutated_kernel_is_correct(data):
    """The control for the tests below: the same inputs without a mutation pass."""
    args, ref = data
    assert not caught(emulated_chunk_gla, args, ref, lambda s: s)
    assert not caught(emulated_recurrent_gla, args, ref, lambda s: s)


def test_chunk_kernel_has_barriers():
    assert N_BARRIERS >= 6


@pytest.mark.parametrize("i", range(N_BARRIERS))
def test_missing_barrier_is_caught(data, i):
    """Dropping any single barrier of the chunk kernel changes the results."""
    args, ref = data

    def drop(src):
        n = iter(range(10**6))
        return BARRIER.sub(lambda m: "" if next(n) == i else m.group(0), src)

    assert drop(CHUNK_SRC) != CHUNK_SRC
    assert caught(emulated_chunk_gla, args, ref, drop)


TILE_MUTATIONS = {
    # v tile of the wrong value-column slice (another simdgroup's) in the state update
    "state_update_v_slice": ("simdgroup_load(vt, Vs + 8 * I * BV + 8 * sg, BV);",
                             "simdgroup_load(vt, Vs + 8 * I * BV + 8 * ((sg + 1) % NSG), BV);"),
    # intra-chunk product with the row block's v instead of the column block's
    "intra_v_row_block": ("simdgroup_load(vt, Vs + 8 * J * BV + 8 * sg, BV);",
                          "simdgroup_load(vt, Vs + 8 * I * BV + 8 * sg, BV);"),
    # off-diagonal A tile written to the transposed block position
    "A_tile_transposed_position": ("simdgroup_store(Aoff, As + 8 * pI * C + 8 * pJ, C);",
                                   "simdgroup_store(Aoff, As + 8 * pJ * C + 8 * pI, C);"),
    # keys not transposed in the off-diagonal product
    "A_tile_missing_transpose": ("simdgroup_load(bt, KRs + sg * 8 * BK + 8 * kk, BK, ulong2(0, 0), true);",
                                 "simdgroup_load(bt, KRs + sg * 8 * BK + 8 * kk, BK, ulong2(0, 0), false);"),
    # one lane of each simdgroup loads its fragment from the neighbouring tile
    "one_lane_wrong_tile": ("simdgroup_load(a, Qs + 8 * I * BK + 8 * kk, BK);",
                            "simdgroup_load(a, Qs + 8 * I * BK + 8 * (lane == 5 ? (kk + 1) % (BK / 8) : kk), BK);"),
}


@pytest.mark.parametrize("name", sorted(TILE_MUTATIONS))
def test_wrong_simdgroup_tile_is_caught(data, name):
    args, ref = data
    old, new = TILE_MUTATIONS[name]
    assert CHUNK_SRC.count(old) == 1, "mutation target not found in the kernel"
    assert caught(emulated_chunk_gla, args, ref, lambda s: s.replace(old, new))


def test_incomplete_simd_reduction_is_caught(data):
    """A butterfly that stops one level short sums 16 of 32 lanes: the emulator's
    simd_shuffle_xor really exchanges lane values, so this is wrong."""
    args, ref = data
    tree = "".join(f"acc += simd_shuffle_xor(acc, {m});\n" for m in (1, 2, 4, 8))
    full = tree + "acc += simd_shuffle_xor(acc, 16);\n"
    src = metal_emu._kernels().kernel_spec("recurrent", "float32", 64, 64)["source"]
    assert "acc = simd_sum(acc);" in src
    # The complete butterfly is a correct replacement, so the test checks the exchange,
    # not the text.
    assert not caught(emulated_recurrent_gla, args, ref, lambda s: s.replace("acc = simd_sum(acc);", full))
    assert caught(emulated_recurrent_gla, args, ref, lambda s: s.replace("acc = simd_sum(acc);", tree))


def test_divergent_barrier_is_reported(data):
    """A barrier only some threads reach is a hang on a GPU; the emulator says so."""
    args, _ = data
    old = "threadgroup_barrier(mem_flags::mem_threadgroup);"

    def diverge(src):
        return src.replace(old, "if (tid < 128) { " + old + " }", 1)

    with pytest.raises(EmulationError, match="deadlock"):
        emulated_chunk_gla(*args[:4], None, args[4], source_transform=diverge)


def test_divergent_simd_collective_is_reported(data):
    args, _ = data
    with pytest.raises(EmulationError, match="deadlock"):
        emulated_recurrent_gla(*args[:4], None, args[4],
                               source_transform=lambda s: s.replace("acc = simd_sum(acc);",
                                                                    "if (lane < 16) acc = simd_sum(acc);"))


def test_unwritten_output_is_caught(data):
    """Outputs start as NaN, so rows a kernel forgets to write show up."""
    args, ref = data
    assert caught(emulated_chunk_gla, args, ref, lambda s: s.replace("if (c0 + (int)lane < T) {",
                                                                     "if (c0 + (int)lane < T - 1) {"))


def test_signature_matches_mlx(capfd, tmp_path):
    """The emulator wraps the body exactly as MLX does: MLX (CPU build) writes its
    generated source when a metal_kernel call is traced for export with verbose=True."""
    mx = pytest.importorskip("mlx.core")
    ks = metal_emu._kernels()
    B, T, H, K, V = 1, 5, 2, 64, 128
    for kind, dt in (("chunk", "float16"), ("recurrent", "bfloat16"), ("chunk", "float32")):
        s = ks.kernel_spec(kind, dt, K, V, B, H)
        kern = mx.fast.metal_kernel(name=s["name"], input_names=s["input_names"],
                                    output_names=s["output_names"], source=s["source"], header=s["header"])
        mdt = getattr(mx, dt)

        def f(q, k, v, g, h0, scale):
            return kern(inputs=[q, k, v, g, h0, scale],
                        template=[("OutT", mdt), ("K", K), ("V", V)],
                        grid=s["grid"], threadgroup=s["threadgroup"],
                        output_shapes=[(B, T, H, V), (B, H, K, V)],
                        output_dtypes=[mdt, mx.float32], verbose=True)

        args = [mx.zeros((B, T, H, K), mdt), mx.zeros((B, T, H, K), mdt), mx.zeros((B, T, H, V), mdt),
                mx.zeros((B, T, H, K), mx.float32), mx.zeros((B, H, K, V)), mx.array(0.125)]
        capfd.readouterr()
        try:
            mx.export_function(str(tmp_path / f"{kind}_{dt}.mlxfn"), f, *args)
        except Exception as e:  # pragma: no cover - depends on the MLX version
            pytest.skip(f"this MLX cannot trace metal_kernel without Metal: {e}")
        out = capfd.readouterr().out
        assert "Generated source code" in out, "MLX did not print the generated source"
        generated = out[out.index("```\n") + 4: out.rindex("\n```")]
        inputs = [(dt, (B, T, H, K)), (dt, (B, T, H, K)), (dt, (B, T, H, V)), ("float32", (B, T, H, K)),
                  ("float32", (B, H, K, V)), ("float32", ())]
        _, ours, *_ = metal_emu.mlx_kernel_source(s, inputs, [dt, "float32"])
        assert generated == ours.rstrip("\n") or generated == ours


TOY_BODY = """
  uint i = thread_position_in_grid.x;
  int r = i / x_shape[1];
  int col = i % x_shape[1];
  float lane_sum = simd_sum(x[r * x_strides[0] + col * x_strides[1]]);
  out[i] = x[r * x_strides[0] + col * x_strides[1]] * c[i % 3] + s + float(x_ndim)
           + 1000.0f * float(threads_per_simdgroup == 32 && grid_size.x == 64) + lane_sum;
"""


def toy_spec():
    return dict(name="toy", source=TOY_BODY, header="", input_names=["x", "c", "s"],
                output_names=["out"], template=[], grid=(64, 1, 1), threadgroup=(64, 1, 1))


def test_generic_signature_and_launch(capfd, tmp_path):
    """Shape/stride/ndim buffers, a small (constant address space) input, a 0-d input,
    attributes without template arguments: same text as MLX, and the launcher feeds them."""
    x = np.arange(64, dtype=np.float32).reshape(8, 8) / 7
    c = np.array([1.0, -2.0, 0.5], np.float32)
    s = np.int32(3)
    spec_ = toy_spec()
    (out,) = metal_emu.run(spec_, [x, c, s], ["float32", "float32", "int32"], [(64,)], ["float32"])
    idx = np.arange(64)
    lane_sums = np.repeat(x.reshape(2, 32).sum(1), 32)
    want = x.reshape(-1) * c[idx % 3] + 3 + 2 + 1000 + lane_sums
    np.testing.assert_allclose(out, want, rtol=1e-6)

    mx = pytest.importorskip("mlx.core")
    kern = mx.fast.metal_kernel(name="toy", input_names=spec_["input_names"], output_names=["out"],
                                source=TOY_BODY)

    def f(xa, ca, sa):
        return kern(inputs=[xa, ca, sa], grid=(64, 1, 1), threadgroup=(64, 1, 1),
                    output_shapes=[(64,)], output_dtypes=[mx.float32], verbose=True)

    capfd.readouterr()
    try:
        mx.export_function(str(tmp_path / "toy.mlxfn"), f, mx.array(x), mx.array(c), mx.array(s))
    except Exception as e:  # pragma: no cover - depends on the MLX version
        pytest.skip(f"this MLX cannot trace metal_kernel without Metal: {e}")
    txt = capfd.readouterr().out
    generated = txt[txt.index("```\n") + 4: txt.rindex("\n```")]
    _, ours, *_ = metal_emu.mlx_kernel_source(spec_, [("float32", (8, 8)), ("float32", (3,)), ("int32", ())],
                                              ["float32"])
    assert generated == ours.rstrip("\n") or generated == ours


# ---------------------------------------------------------------- strictness
# A small kernel in the shape of the GLA kernels (threadgroup tile, simdgroup matrix
# accumulators, a masked tile): out = tril(x) @ w for 16 x 16 matrices, one threadgroup of
# two simdgroups. Each sabotage below is code a Metal compiler rejects or a GPU runs wrong,
# which the emulator accepted before it poisoned memory, checked bounds and kept address
# spaces apart (issue #22).
PROBE_BODY = """
  threadgroup float xs[256];
  const uint tid = thread_index_in_threadgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  for (uint e = tid; e < 256; e += 64) {
    const uint r = e / 16, c = e % 16;
    xs[e] = c <= r ? x[e] : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  threadgroup float* xt = xs + 0;
  simdgroup_float8x8 acc[2];
  for (int j = 0; j < 2; ++j) acc[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int kk = 0; kk < 2; ++kk) {
    simdgroup_float8x8 a, b;
    simdgroup_load(a, xt + 8 * sg * 16 + 8 * kk, 16);
    for (int j = 0; j < 2; ++j) {
      simdgroup_load(b, w + 8 * kk * 16 + 8 * j, 16);
      simdgroup_multiply_accumulate(acc[j], a, b, acc[j]);
    }
  }
  for (int j = 0; j < 2; ++j) simdgroup_store(acc[j], out + 8 * sg * 16 + 8 * j, 16);
"""

SABOTAGE = {
    # 256 + 8704 floats = 35 KB of threadgroup memory; Apple GPUs have 32 KB
    "threadgroup_35KB": ("threadgroup float xs[256];", "threadgroup float xs[256 + 8704];", "threadgroup memory"),
    "double": ("xs[e] = c <= r ? x[e] : 0.0f;", "double d = x[e]; xs[e] = c <= r ? d : 0.0;", "double"),
    "threadgroup_to_plain_pointer": ("threadgroup float* xt = xs + 0;", "float* xt = xs + 0;", "cannot convert"),
    "device_to_threadgroup_pointer": ("threadgroup float* xt = xs + 0;", "threadgroup const float* xt = x + 0;",
                                      "conver"),
    "accumulator_not_zeroed": ("for (int j = 0; j < 2; ++j) acc[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);",
                               "", None),
    "tile_not_zeroed": ("xs[e] = c <= r ? x[e] : 0.0f;", "if (c <= r) xs[e] = x[e];", None),
    "out_of_bounds_device_read": ("xs[e] = c <= r ? x[e] : 0.0f;", "xs[e] = c <= r ? x[e] + 0.0f * x[e + 16] : 0.0f;",
                                  "out-of-bounds device access: x\\[2[5-9][0-9]\\], buffer of 256"),
    "out_of_bounds_device_write": ("simdgroup_store(acc[j], out + 8 * sg * 16 + 8 * j, 16);",
                                   "simdgroup_store(acc[j], out + 8 * sg * 16 + 8 * j + 8, 16);",
                                   "out-of-bounds device access: out"),
    "out_of_bounds_threadgroup": ("simdgroup_load(a, xt + 8 * sg * 16 + 8 * kk, 16);",
                                  "simdgroup_load(a, xt + 8 * sg * 16 + 8 * kk + 128, 16);",
                                  "out-of-bounds threadgroup access: xs"),
}


def run_probe(body):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 16)).astype(np.float32)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    spec_ = dict(name="probe", source=body, header="", input_names=["x", "w"], output_names=["out"],
                 template=[], grid=(64, 1, 1), threadgroup=(64, 1, 1))
    (out,) = metal_emu.run(spec_, [x, w], ["float32", "float32"], [(16, 16)], ["float32"])
    return out, np.tril(x).astype(np.float64) @ w


def test_probe_kernel_is_correct():
    out, ref = run_probe(PROBE_BODY)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SABOTAGE))
def test_sabotage_is_caught(name):
    old, new, message = SABOTAGE[name]
    assert PROBE_BODY.count(old) == 1
    body = PROBE_BODY.replace(old, new)
    if message is not None:
        with pytest.raises(EmulationError, match=message):
            run_probe(body)
    else:  # runs, and the poison shows in the result
        out, ref = run_probe(body)
        assert not np.isfinite(out).all()


def test_strict_rewrite_leaves_no_unchecked_address_space():
    """Qualified forms the rewrite does not know (a device reference, a 2-D threadgroup
    array) fail to compile instead of running unchecked."""
    for body in ("device float& r = out[0]; r = 1.0f;",
                 "threadgroup float t2[4][4]; t2[0][0] = 1.0f; out[0] = t2[0][0];"):
        with pytest.raises(EmulationError, match="EMU_ERROR_unsupported"):
            run_probe(PROBE_BODY + body)
