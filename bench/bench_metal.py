"""regla's Metal GLA kernels on Apple Silicon: a correctness check against the float64 spec,
then the speed of prefill (chunked op) and decode (token-by-token kernel) for one attention
layer of GLA 1.3B shape by default. Writes one markdown report to send back:

    python bench/bench_metal.py --out metal-report.md

Timing. A sync (``mx.eval``) costs a round trip of ~0.1-0.5 ms, more than a decode step's
kernel (10-60 us), so each measurement chains n calls whose state feeds the next (as
consecutive decode steps, or prefill segments, depend on each other), evaluates them with
one ``mx.eval`` and divides by n; n doubles until one sync takes >= --min-ms. Reported:
the median over --repeats such syncs. "GB/s" is the bytes the op must move (BENCHMARKS.md
section 3) over the measured time; "threadgroups" is what each launch puts on the GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dk", type=int, default=256, help="key head dim (64, 128 or 256)")
    p.add_argument("--dv", type=int, default=512, help="value head dim (multiple of 64)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--lengths", default="512,2048,8192", help="prefill lengths (batch 1)")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--layers", type=int, default=24, help="scales one layer's time to a whole model")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-ms", type=float, default=50.0, help="shortest sync to time")
    p.add_argument("--token-prefill-up-to", type=int, default=2048,
                   help="also time prefill token by token (the decode kernel) up to this length")
    p.add_argument("--out", help="also write the report to this file")
    return p.parse_args()


def chained_time(step, state, min_ms, repeats):
    """Seconds per call of ``step(state) -> (outputs, state)``, n calls per sync."""
    import mlx.core as mx

    def run(n):
        s, outs = state, []
        t0 = time.perf_counter()
        for _ in range(n):
            o, s = step(s)
            outs.append(o)
        mx.eval(outs, s)
        return time.perf_counter() - t0

    run(1)  # compile the kernels, allocate
    n = 1
    while run(n) * 1e3 < min_ms and n < 1 << 14:
        n *= 2
    return statistics.median(run(n) for _ in range(repeats)) / n, n


def sync_time(repeats=20):
    import mlx.core as mx

    x = mx.array(1.0)
    mx.eval(x + 1)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(x + 1)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def checks():
    """The kernels against regla.spec (float64) on the GPU: (name, rel RMS error, tolerance)."""
    import numpy as np
    import mlx.core as mx

    from regla import spec
    from regla_mlx.kernels import metal_chunk_gla, metal_recurrent_gla

    rng = np.random.default_rng(0)

    def inputs(T, H, K, V, N=1):
        q, k = rng.standard_normal((2, 1, T, H, K)).astype(np.float32)
        v = rng.standard_normal((1, T, H, V)).astype(np.float32)
        g = -1e-3 * rng.random((1, T, H, K))
        g[:, ::13] = -1e4  # issue #20's gates: -1e4 every 13th token, weak between
        g[:, 5::7, :, ::3] = -rng.uniform(1, 30, g[:, 5::7, :, ::3].shape)
        h0 = rng.standard_normal((N, H, K, V)).astype(np.float32)
        return q, k, v, g.astype(np.float32), h0

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))

    rows = []
    for K, V in ((64, 64), (128, 128), (256, 512)):
        q, k, v, g, h0 = inputs(1000, 2, K, V)
        ro, rs = spec.recurrent_gla(q, k, v, g, None, h0)
        for name, fn in (("chunk", metal_chunk_gla), ("recurrent", metal_recurrent_gla)):
            o, s = fn(*(mx.array(x) for x in (q, k, v, g)), K ** -0.5, mx.array(h0), True)
            rows.append((f"{name} fp32 T=1000 K={K} V={V}", max(rel(o, ro), rel(s, rs)), 1e-5))
    cu = [0, 1, 64, 65, 200, 700]
    q, k, v, g, h0 = inputs(cu[-1], 2, 128, 128, N=len(cu) - 1)
    ro, rs = spec.recurrent_gla(q, k, v, g, None, h0, cu_seqlens=cu)
    for name, fn in (("chunk", metal_chunk_gla), ("recurrent", metal_recurrent_gla)):
        o, s = fn(*(mx.array(x) for x in (q, k, v, g)), 128 ** -0.5, mx.array(h0), True, cu)
        rows.append((f"{name} fp32 varlen {cu}", max(rel(o, ro), rel(s, rs)), 1e-5))
    q, k, v, g, h0 = inputs(300, 2, 128, 128)
    xs = [mx.array(x).astype(mx.bfloat16) for x in (q, k, v)] + [mx.array(g)]
    ro, rs = spec.recurrent_gla(*(np.array(x.astype(mx.float32)) for x in xs), None, h0)
    for name, fn in (("chunk", metal_chunk_gla), ("recurrent", metal_recurrent_gla)):
        o, s = fn(*xs, 128 ** -0.5, mx.array(h0), True)
        rows.append((f"{name} bf16 q/k/v, f32 g", max(rel(o.astype(mx.float32), ro), rel(s, rs)), 5e-3))
    return rows


def header_lines():
    import mlx.core as mx

    try:
        info = mx.device_info()
    except Exception:  # older MLX
        info = mx.metal.device_info()
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        rev = ""
    chip = info.get("device_name") or info.get("architecture", "?")
    mem = info.get("memory_size", 0) / 2 ** 30
    return [f"- device: {chip} ({info.get('architecture', '?')}), {mem:.0f} GiB",
            f"- macOS {platform.mac_ver()[0]}, Python {platform.python_version()}, MLX {mx.__version__}, "
            f"regla {rev or '?'}"]


def main():
    args = parse()
    try:
        import mlx.core as mx
    except ImportError:
        sys.exit("bench_metal.py needs MLX: pip install 'regla[mlx]'")
    if not mx.metal.is_available():
        sys.exit("bench_metal.py measures the Metal kernels and needs an Apple Silicon Mac with Metal; "
                 "mx.metal.is_available() is False here. (On Linux the kernels are checked, not timed, "
                 "by the CPU emulator: pytest tests/test_metal_emulated.py tests/test_ops_metal_emulated.py.)")
    from regla_mlx import kernels
    from regla_mlx.kernels import metal_chunk_gla, metal_recurrent_gla

    H, K, V, L = args.heads, args.dk, args.dv, args.layers
    dt = getattr(mx, args.dtype)
    esize = 4 if args.dtype == "float32" else 2
    scale = K ** -0.5
    out = ["# regla Metal kernels: report", ""] + header_lines()
    out += [f"- shapes: {H} heads, K {K}, V {V}, {args.dtype} (one layer; model columns x{L} layers)", ""]
    print("\n".join(out), flush=True)

    def emit(lines):
        print("\n".join(lines), flush=True)
        out.extend(lines)

    rows = checks()
    emit(["## Correctness (GPU vs float64 spec, rel RMS)", "", "| case | error | tolerance | |", "|---|---|---|---|"]
         + [f"| {n} | {e:.2e} | {t:.0e} | {'ok' if e <= t else '**FAIL**'} |" for n, e, t in rows] + [""])

    def inputs(B, T):
        mx.random.seed(0)
        q = mx.random.normal((B, T, H, K)).astype(dt)
        k = mx.random.normal((B, T, H, K)).astype(dt)
        v = mx.random.normal((B, T, H, V)).astype(dt)
        g = mx.log(mx.random.uniform(0.9, 1.0, (B, T, H, K)))
        h0 = mx.zeros((B, H, K, V), mx.float32)
        mx.eval(q, k, v, g, h0)
        return q, k, v, g, h0

    # Bytes an op must move per layer: q, k, v, o in the input dtype, g in f32, the state
    # in and out once per sequence (BENCHMARKS.md section 3).
    def io_bytes(B, T):
        return B * T * H * (2 * K * esize + 4 * K + 2 * V * esize) + 2 * B * H * K * V * 4

    rt = sync_time()
    emit([f"One sync (mx.eval round trip): {rt * 1e3:.3f} ms; times below are per call, n calls per sync.", ""])

    lines = ["## Prefill, batch 1 (chunked op: 3 launches)", "",
             "| T | threadgroups a/h/o | ms | tok/s | GB/s | n/sync | token-by-token ms | speedup | model attn us/tok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for T in [int(x) for x in args.lengths.split(",")]:
        q, k, v, g, h0 = inputs(1, T)
        NT = -(-T // kernels.CHUNK)
        tgs = f"{NT * H}/{(K // 32) * (V // 64) * H}/{(V // 64) * NT * H}"
        tc, n = chained_time(lambda s: metal_chunk_gla(q, k, v, g, scale, s, True), h0, args.min_ms, args.repeats)
        row = f"| {T} | {tgs} | {tc * 1e3:.3f} | {T / tc:,.0f} | {io_bytes(1, T) / tc / 1e9:.1f} | {n} | "
        if T <= args.token_prefill_up_to:
            tr, _ = chained_time(lambda s: metal_recurrent_gla(q, k, v, g, scale, s, True), h0, args.min_ms,
                                 args.repeats)
            row += f"{tr * 1e3:.3f} | {tr / tc:.1f}x |"
        else:
            row += "- | - |"
        row += f" {tc / T * L * 1e6:.2f} |"
        lines.append(row)
    emit(lines + [""])

    lines = ["## Decode, one token per sequence (token-by-token kernel)", "",
             "| batch | threadgroups | us/step | tokens/s (kernel) | GB/s | n/sync | model attn us/step |",
             "|---|---|---|---|---|---|---|"]
    for B in [int(x) for x in args.batches.split(",")]:
        q, k, v, g, h0 = inputs(B, 1)
        td, n = chained_time(lambda s: metal_recurrent_gla(q, k, v, g, scale, s, True), h0, args.min_ms,
                             args.repeats)
        lines.append(f"| {B} | {(V // 32) * B * H} | {td * 1e6:.1f} | {B / td:,.0f} | {io_bytes(B, 1) / td / 1e9:.1f} |"
                     f" {n} | {td * L * 1e6:.0f} |")
    emit(lines + ["", "Decode tokens/s of a whole model are bound by reading the weights (2.6 GB per token for "
                  "GLA 1.3B in fp16), not by these kernels; see BENCHMARKS.md section 3."])
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(out) + "\n")
        os.replace(tmp, args.out)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
