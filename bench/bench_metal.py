"""Speed of regla's Metal GLA kernels on Apple Silicon: prefill (chunk kernel) and decode
(recurrent kernel), one attention layer, shapes of the GLA 1.3B model by default.

    python bench/bench_metal.py [--heads 4] [--dk 256] [--dv 512] [--dtype float16]
                                [--lengths 512,2048,8192] [--batches 1,8,32] [--layers 24]

For each prefill length T it times the chunk kernel and, for comparison, the token-by-token
kernel run over the same T tokens (what a recurrent-only backend does for prefill). For
decode it times one step of the recurrent kernel at several batch sizes. Times are medians
over repeated runs after a warm-up, each run synchronised with mx.eval. The "GB/s" column
is the bytes the kernel must move (BENCHMARKS.md (section 3)) over the measured time.
"--layers" scales the per-layer time to the whole model's attention kernels per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dk", type=int, default=256, help="key head dim (64, 128 or 256)")
    p.add_argument("--dv", type=int, default=512, help="value head dim (multiple of 64)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip-token-prefill-above", type=int, default=8192,
                   help="do not time the token-by-token kernel for longer prefills")
    return p.parse_args()


def median_time(fn, repeats):
    import mlx.core as mx

    for _ in range(3):
        mx.eval(*fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(*fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    args = parse()
    try:
        import mlx.core as mx
    except ImportError:
        sys.exit("bench_metal.py needs MLX: pip install 'regla[mlx]'")
    if not mx.metal.is_available():
        sys.exit("bench_metal.py measures the Metal kernels and needs an Apple Silicon Mac with Metal; "
                 "mx.metal.is_available() is False here. (On Linux the kernels are checked, not timed, "
                 "by the CPU emulator: pytest tests/test_metal_emulated.py.)")
    from regla_mlx.kernels import metal_chunk_gla, metal_recurrent_gla

    H, K, V, L = args.heads, args.dk, args.dv, args.layers
    dt = getattr(mx, args.dtype)
    esize = 4 if args.dtype == "float32" else 2
    state_bytes = H * K * V * 4
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        name = info.get("device_name", "?")
    except Exception:
        name = "?"
    print(f"device: {name}   heads {H}  K {K}  V {V}  {args.dtype}  (per layer; x{L} layers for model rows)")

    def inputs(B, T):
        mx.random.seed(0)
        q = mx.random.normal((B, T, H, K)).astype(dt)
        k = mx.random.normal((B, T, H, K)).astype(dt)
        v = mx.random.normal((B, T, H, V)).astype(dt)
        g = mx.log(mx.random.uniform(0.9, 1.0, (B, T, H, K))).astype(dt)
        h0 = mx.zeros((B, H, K, V), mx.float32)
        mx.eval(q, k, v, g, h0)
        return q, k, v, g, h0

    # Bytes each kernel must move, per token and layer (BENCHMARKS.md, section 3):
    # q, k, g (H*K each) and v, o (H*V each) once, plus the state in and out per sequence.
    def io_bytes(B, T):
        return B * T * H * (3 * K + 2 * V) * esize + 2 * B * state_bytes

    print("\nprefill (B=1)")
    print(f"{'T':>6} | {'chunk ms':>9} {'tok/s':>10} {'GB/s':>6} | {'token-by-token ms':>17} {'tok/s':>10} |"
          f" {'speedup':>7} | {'model attn ms/tok':>17}")
    for T in [int(x) for x in args.lengths.split(",")]:
        q, k, v, g, h0 = inputs(1, T)
        tc = median_time(lambda: metal_chunk_gla(q, k, v, g, K ** -0.5, h0, True), args.repeats)
        row = f"{T:>6} | {tc * 1e3:>9.3f} {T / tc:>10.0f} {io_bytes(1, T) / tc / 1e9:>6.1f} | "
        if T <= args.skip_token_prefill_above:
            tr = median_time(lambda: metal_recurrent_gla(q, k, v, g, K ** -0.5, h0, True),
                             max(3, args.repeats // 4))
            row += f"{tr * 1e3:>17.3f} {T / tr:>10.0f} | {tr / tc:>6.1f}x |"
        else:
            row += f"{'-':>17} {'-':>10} | {'-':>7} |"
        row += f" {tc / T * L * 1e3:>17.4f}"
        print(row)

    print("\ndecode (one step)")
    print(f"{'B':>4} | {'us/step':>9} {'tok/s (kernel)':>15} {'GB/s':>6} | {'model attn ms/step':>18}")
    for B in [int(x) for x in args.batches.split(",")]:
        q, k, v, g, h0 = inputs(B, 1)
        td = median_time(lambda: metal_recurrent_gla(q, k, v, g, K ** -0.5, h0, True), args.repeats)
        print(f"{B:>4} | {td * 1e6:>9.1f} {B / td:>15.0f} {io_bytes(B, 1) / td / 1e9:>6.1f} |"
              f" {td * L * 1e3:>18.4f}")
    print("\nDecode tokens/s of a whole model are bound by the weights (2.6 GB per token for GLA 1.3B in"
          " fp16), not by these kernels; see BENCHMARKS.md (section 3).")


if __name__ == "__main__":
    main()
