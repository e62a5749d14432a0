"""Tests of the Metal emulator itself: it must reproduce MLX's generated source, and it must
catch the bugs that only show on a GPU (a missing barrier, a wrong simdgroup tile, a
reduction that does not reach all lanes, a barrier not all threads reach, memory or
accumulators used before they are written, out-of-bounds accesses, code Metal does not
compile)."""

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

pytest.importorskip("mlx.core", reason="MLX is not installed (pip install '.[mlx]')")

import metal_emu  # noqa: E402
from metal_emu import EmulationError, emulated_gla  # noqa: E402
from regla_mlx import kernels  # noqa: E402

BARRIER = re.compile(r"(threadgroup|simdgroup)_barrier\(mem_flags::mem_threadgroup\);")
# kernel name -> (op that launches it, its source)
KERNELS = {}
for _kind, _op in (("chunk_h", "chunk"), ("chunk_a", "chunk"), ("chunk_o", "chunk"), ("recurrent", "recurrent")):
    _s = kernels.kernel_spec(_kind, K=64, V=64)
    KERNELS[_s["name"]] = (_op, _s["source"])
BARRIERS = [(name, i) for name, (_, src) in KERNELS.items() for i in range(len(BARRIER.findall(src)))]
# two packed sequences: chunks of 35, 64 and 1 rows; two key and value tiles
CU = [0, 35, 100]


@pytest.fixture(scope="module")
def data():
    q, k, v, g, _ = make_inputs(1, 100, 1, 64, 128, gates="mixed", seed=11, with_state=False)
    h0 = np.random.default_rng(12).standard_normal((2, 1, 64, 128)).astype(np.float32)
    return (q, k, v, g, h0), spec.recurrent_gla(q, k, v, g, None, h0, cu_seqlens=CU)


def caught(op, args, ref, transform, seed=0):
    """True when the mutated kernels give a visibly wrong result or the emulator
    reports an error."""
    try:
        o, s = emulated_gla(op, *args[:4], None, args[4], cu_seqlens=CU, transform=transform, seed=seed)
    except EmulationError:
        return True
    o = np.asarray(o, np.float64)
    if not (np.isfinite(o).all() and np.isfinite(s).all()):
        return True
    return rel_rms(o, ref[0]) > 1e-3 or rel_rms(s, ref[1]) > 1e-3


def replace_once(name, old, new):
    src = KERNELS[name][1]
    assert src.count(old) == 1, f"mutation target not found once in {name}: {old}"
    return {name: lambda s: s.replace(old, new)}


def test_unmutated_kernels_are_correct(data):
    """The control for the tests below: the same inputs without a mutation pass."""
    args, ref = data
    assert not caught("chunk", args, ref, None)
    assert not caught("recurrent", args, ref, None)


def test_kernels_have_barriers():
    assert len(BARRIERS) >= 10


@pytest.mark.parametrize("name,i", BARRIERS)
def test_missing_barrier_is_caught(data, name, i):
    """Dropping any single barrier of any kernel changes the results."""
    args, ref = data

    def drop(src):
        n = iter(range(10**6))
        return BARRIER.sub(lambda m: "" if next(n) == i else m.group(0), src)

    assert drop(KERNELS[name][1]) != KERNELS[name][1]
    assert caught(KERNELS[name][0], args, ref, {name: drop})


MUTATIONS = {
    # state update with another simdgroup's value columns
    "h_v_slice": ("regla_gla_chunk_h", "simdgroup_load(vt, vs + 8 * I * BV + 8 * sg, BV);",
                  "simdgroup_load(vt, vs + 8 * I * BV + 8 * ((sg + 1) % 8), BV);"),
    # decayed keys not transposed in the state update
    "h_k_not_transposed": ("regla_gla_chunk_h", "simdgroup_load(kT, kd + 8 * I * BK + 8 * kt, BK, ulong2(0, 0), true);",
                           "simdgroup_load(kT, kd + 8 * I * BK + 8 * kt, BK, ulong2(0, 0), false);"),
    # the decay of the state uses the sum of all rows but the last block
    "h_decay_missing_block": ("regla_gla_chunk_h", "for (int b2 = blk + 1; b2 < 8; ++b2) suf += tot[b2 * BK + kc];",
                              "for (int b2 = blk + 1; b2 < 7; ++b2) suf += tot[b2 * BK + kc];"),
    # an off-diagonal score tile stored at the transposed block
    "a_tile_transposed_position": ("regla_gla_chunk_a", "simdgroup_store(acc[u], A + base + 8 * pI[u] * C + 8 * pJ[u], C);",
                                   "simdgroup_store(acc[u], A + base + 8 * pJ[u] * C + 8 * pI[u], C);"),
    # keys not transposed in the off-diagonal scores
    "a_keys_not_transposed": ("regla_gla_chunk_a", "simdgroup_load(b, kpt + 8 * kk, BK, ulong2(0, 0), true);",
                              "simdgroup_load(b, kpt + 8 * kk, BK, ulong2(0, 0), false);"),
    # the gate of the reference row left out of the pair factor
    "a_pair_factor_without_reference_row": ("regla_gla_chunk_a", "float s = gs[8 * I * BK + c];", "float s = 0.0f;"),
    # the diagonal blocks' upper triangles left unwritten (the o kernel reads them)
    "a_upper_triangle_not_zeroed": ("regla_gla_chunk_a",
                                    "A[base + (8 * dblk + i) * C + 8 * dblk + j] = j <= i ? adiag[u] : 0.0f;",
                                    "if (j <= i) A[base + (8 * dblk + i) * C + 8 * dblk + j] = adiag[u];"),
    # score tile (J, I) instead of (I, J) in the output
    "o_scores_transposed": ("regla_gla_chunk_o", "simdgroup_load(a, A + abase + 8 * I * C + 8 * J, C);",
                            "simdgroup_load(a, A + abase + 8 * J * C + 8 * I, C);"),
    # one lane of each simdgroup loads its fragment of the state from the neighbouring tile
    "o_one_lane_wrong_state_tile": ("regla_gla_chunk_o",
                                    "simdgroup_load(hm, h + hbase + (size_t)(kb0 + 8 * kk) * V + vc, V);",
                                    "simdgroup_load(hm, h + hbase + (size_t)(kb0 + 8 * kk) * V + vc + (lane == 5 ? 8 : 0), V);"),
    # output accumulators never zeroed
    "o_accumulators_not_zeroed": ("regla_gla_chunk_o",
                                  "for (int I = 0; I < 8; ++I) O[I] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);",
                                  ""),
    # the last row of every chunk not written
    "o_row_not_written": ("regla_gla_chunk_o", "if (r < t1) {", "if (r < t1 - 1) {"),
    # the decay of the queries from the chunk's start misses the earlier blocks
    "o_query_decay_in_block_only": ("regla_gla_chunk_o", "qe[(8 * blk + i) * BK + kc] = qv * exp(before + pre[i]);",
                                    "qe[(8 * blk + i) * BK + kc] = qv * exp(pre[i]);"),
    # rows past a sequence's end read (the next sequence's rows, or past the buffer)
    "o_reads_past_chunk_end": ("regla_gla_chunk_o",
                               "vs[e] = r < t1 ? static_cast<float>(v[((size_t)r * H + hh) * V + v0 + e % BV]) : 0.0f;",
                               "vs[e] = static_cast<float>(v[((size_t)r * H + hh) * V + v0 + e % BV]);"),
    # the eight simdgroups' shares added up by only seven
    "recurrent_missing_share": ("regla_gla_recurrent_fwd", "for (int s = 0; s < NS; ++s) sum += slot[s * 32 + lane];",
                                "for (int s = 1; s < NS; ++s) sum += slot[s * 32 + lane];"),
    # the initial state of the neighbouring value column
    "recurrent_initial_state_column": ("regla_gla_recurrent_fwd", "st[i] = h0[((size_t)nh * K + kr + i) * V + col];",
                                       "st[i] = h0[((size_t)nh * K + kr + i) * V + (col ^ 1)];"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mutation_is_caught(data, mutation):
    args, ref = data
    name, old, new = MUTATIONS[mutation]
    assert caught(KERNELS[name][0], args, ref, replace_once(name, old, new))


def test_divergent_barrier_is_reported(data):
    """A barrier only some threads reach is a hang on a GPU; the emulator says so."""
    args, _ = data
    old = "threadgroup_barrier(mem_flags::mem_threadgroup);"
    with pytest.raises(EmulationError, match="deadlock"):
        emulated_gla("chunk", *args[:4], None, args[4], cu_seqlens=CU,
                     transform={"regla_gla_chunk_h": lambda s: s.replace(old, "if (tid < 128) { " + old + " }", 1)})


def test_divergent_simd_collective_is_reported(data):
    """A simdgroup operation only some lanes reach."""
    args, _ = data
    old = "simdgroup_multiply_accumulate(O[I], a, hm, O[I]);"
    with pytest.raises(EmulationError, match="deadlock"):
        emulated_gla("chunk", *args[:4], None, args[4], cu_seqlens=CU,
                     transform=replace_once("regla_gla_chunk_o", old, "if (lane < 16) " + old))


def test_incomplete_simd_reduction_is_caught():
    """A butterfly that stops one level short sums 16 of 32 lanes: the emulator's
    simd_shuffle_xor really exchanges lane values, so this is wrong."""
    body = """
  float acc = x[thread_position_in_grid.x];
  %s
  out[thread_position_in_grid.x] = acc;
"""
    tree = "".join(f"acc += simd_shuffle_xor(acc, {m});\n" for m in (1, 2, 4, 8))
    x = np.arange(64, dtype=np.float32)
    spec_ = dict(name="red", header="", input_names=["x"], output_names=["out"], template=[],
                 grid=(64, 1, 1), threadgroup=(64, 1, 1))
    want = np.repeat(x.reshape(2, 32).sum(1), 32)
    for reduction, right in (("acc = simd_sum(acc);", True), (tree + "acc += simd_shuffle_xor(acc, 16);", True),
                             (tree, False)):
        (out,) = metal_emu.run(dict(spec_, source=body % reduction), [x], ["float32"], [(64,)], ["float32"])
        assert np.array_equal(out, want) == right


def test_signature_matches_mlx(capfd, tmp_path):
    """The emulator wraps the body exactly as MLX does: MLX (CPU build) writes its
    generated source when a metal_kernel call is traced for export with verbose=True."""
    mx = pytest.importorskip("mlx.core")
    B, T, H, K, V = 1, 5, 2, 64, 128
    shapes = {"q": (B, T, H, K), "k": (B, T, H, K), "g": (B, T, H, K), "v": (B, T, H, V), "h0": (1, H, K, V),
              "cu": (2,), "coff": (2,), "chunks": (1, 2), "A": (1, H, 64, 64), "h": (1, H, K, V), "scale": ()}
    dts = {"q": "float16", "k": "bfloat16", "v": "float16", "g": "float32", "cu": "int32", "coff": "int32",
           "chunks": "int32"}
    for kind in ("chunk_h", "chunk_a", "chunk_o", "recurrent"):
        s = kernels.kernel_spec(kind, K=K, V=V, H=H, dtype="float16")
        kern = mx.fast.metal_kernel(name=s["name"], input_names=s["input_names"],
                                    output_names=s["output_names"], source=s["source"], header=s["header"])
        inputs = [(dts.get(n, "float32"), shapes[n]) for n in s["input_names"]]
        out_dt = ["float16" if n == "o" else "float32" for n in s["output_names"]]
        out_shapes = [(1, 1, 1, 1)] * len(out_dt)

        def f(*xs):
            return kern(inputs=list(xs), template=[(n, getattr(mx, v) if n == "OutT" else v) for n, v in s["template"]],
                        grid=s["grid"], threadgroup=s["threadgroup"], output_shapes=out_shapes,
                        output_dtypes=[getattr(mx, d) for d in out_dt], verbose=True)

        args = [mx.zeros(shp, getattr(mx, dt)) for dt, shp in inputs]
        capfd.readouterr()
        try:
            mx.export_function(str(tmp_path / f"{kind}.mlxfn"), f, *args)
        except Exception as e:  # pragma: no cover - depends on the MLX version
            pytest.skip(f"this MLX cannot trace metal_kernel without Metal: {e}")
        out = capfd.readouterr().out
        assert "Generated source code" in out, "MLX did not print the generated source"
        generated = out[out.index("```\n") + 4: out.rindex("\n```")]
        _, ours, *_ = metal_emu.mlx_kernel_source(s, inputs, out_dt)
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
