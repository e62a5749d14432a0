"""Where the chunk op's time goes on CUDA: GPU time per kernel against the wall time.

    python bench/profile_ops.py [--shapes B,T,H,D ...] [--iters 10] [--dtype bf16]

For each shape, forward+backward of ``regla_torch.ops.triton.chunk_gla`` (bf16 q, k, v; fp32
log gate ``logsigmoid(randn)/16``): the median wall time (``triton.testing.do_bench``, as in
bench_ops.py), the summed GPU time of its kernels per call (torch.profiler), the gap between
the two (launch/host overhead when the GPU idles), and each kernel's share with its floor,
the bytes it must move over 4.3 TB/s. Meant to run alone or under ``ncu`` (``--iters 1``)
for the hardware counters of one kernel.
"""
import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_ops import SHAPES  # noqa: E402

BW = 4.3e12


def kernel_times(fn, iters):
    """{kernel name: (calls per iteration, GPU us per iteration)} over ``iters`` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    acc = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            acc[e.name][0] += 1
            acc[e.name][1] += e.device_time
    return {k: (n / iters, t / iters) for k, (n, t) in acc.items()}


def host_time(fb, q, k, v, g, n=200):
    """Host time per call: many calls queued without a sync (the GPU keeps up at small
    shapes, so the host sets the pace), then cProfile's view of where it goes."""
    import cProfile
    import pstats
    import time

    from regla_torch.ops.triton import chunk_gla
    for name, fn in (("fwd (no grad)", lambda: chunk_gla(q.detach(), k.detach(), v.detach(), g.detach())),
                     ("fwd+bwd", fb)):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t) / n
        torch.cuda.synchronize()
        print(f"host time per call, {name}: {host * 1e6:.0f} us", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        fb()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,H,D (default: bench_ops.py's six)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--no-profiler", action="store_true", help="just run fwd+bwd --iters times (for ncu)")
    ap.add_argument("--host", action="store_true", help="also the host (Python) time per call, and where it goes")
    a = ap.parse_args()
    from triton.testing import do_bench

    from regla_torch.ops.triton import chunk_gla
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    shapes = [tuple(int(x) for x in s.split(",")) for s in a.shapes] if a.shapes else SHAPES
    for B, T, H, D in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dt).requires_grad_() for _ in range(3))
        g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16).requires_grad_()
        do = torch.randn_like(v)

        def fb():
            for x in (q, k, v, g):  # no gradient accumulation kernels in the profile
                x.grad = None
            chunk_gla(q, k, v, g)[0].backward(do)

        if a.no_profiler:
            for _ in range(a.iters):
                fb()
            torch.cuda.synchronize()
            continue
        wall = do_bench(fb, warmup=25, rep=100, grad_to_none=[q, k, v, g], return_mode="median") * 1e3
        if a.host:
            host_time(fb, q, k, v, g)
        ks = kernel_times(fb, a.iters)
        gpu = sum(t for _, t in ks.values())
        print(f"\n({B}, {T}, {H}, {D}) {a.dtype} fwd+bwd: wall {wall:.0f} us, GPU busy {gpu:.0f} us, "
              f"gap {wall - gpu:.0f} us, {sum(n for n, _ in ks.values()):.0f} kernels/call", flush=True)
        print("| kernel | calls | us | share |")
        print("|---|---|---|---|")
        for name, (n, t) in sorted(ks.items(), key=lambda kv: -kv[1][1]):
            print(f"| {name[:60]} | {n:.0f} | {t:.0f} | {t / gpu:.0%} |")


if __name__ == "__main__":
    main()
