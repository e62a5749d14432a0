"""Decode-time projections on CUDA: regla's grouped Triton GEMV against cuBLAS (F.linear).

    python bench/bench_gemv.py [--tune] [--rows 1]

Shapes are one layer of the 1.37B GLA model of bench_generate.py (hidden 2048): the grouped
input projections (q, k, v, gate low-rank, output gate: 1024+1024+2048+16+2048 rows), the
MLP's gate and up (2 x 5632), o (2048), down (2048 x 5632) and the 32000-row head. Times are
medians of triton.testing.do_bench (it clears the L2 cache before each call, so weights come
from HBM as in a real step); GB/s counts the weight bytes. ``--tune`` times launch shapes and
prints the best per shape and the best overall.
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {  # name: (row counts of the grouped weights, K)
    "in-proj (5 weights)": ([1024, 1024, 2048, 16, 2048], 2048),
    "gate+up (2)": ([5632, 5632], 2048),
    "o": ([2048], 2048),
    "down": ([2048], 5632),
    "head": ([32000], 2048),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--rows", type=int, default=1)
    a = ap.parse_args()
    from triton.testing import do_bench

    from regla_torch.ops.triton import gemv
    bench = lambda f: do_bench(f, warmup=10, rep=50, return_mode="median") * 1e3
    cases = {}
    for name, (ns, K) in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(a.rows, K, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(n, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for n in ns]
        cases[name] = (x, ws, sum(ns) * K * 2)
        ref = torch.cat([torch.nn.functional.linear(x, w) for w in ws], -1)
        got = gemv.grouped_gemv(x, ws)
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        t_cub = bench(lambda: [torch.nn.functional.linear(x, w) for w in ws])
        t_our = bench(lambda: gemv.grouped_gemv(x, ws))
        gb = cases[name][2] / 1e9
        print(f"{name:22s} {gb * 1e3:7.1f} MB  cuBLAS {t_cub:7.1f} us ({gb / t_cub * 1e6:5.0f} GB/s, {len(ws)} calls)"
              f"  grouped {t_our:7.1f} us ({gb / t_our * 1e6:5.0f} GB/s)  rel err {err:.1e}", flush=True)
    if not a.tune:
        return
    space = dict(BN=[8, 16, 32], BK=[128, 256, 512], num_warps=[4, 8], num_stages=[1, 3])
    total = {}
    default = dict(gemv.CFG)
    for vals in itertools.product(*space.values()):
        cfg = dict(zip(space.keys(), vals))
        gemv.CFG.clear()
        gemv.CFG.update(cfg)
        try:
            ts = {name: bench(lambda: gemv.grouped_gemv(x, ws)) for name, (x, ws, _) in cases.items()}
        except Exception as e:  # noqa: BLE001 (a shape the compiler refuses: skip it)
            print(f"  {cfg}: {type(e).__name__}", flush=True)
            continue
        total[tuple(vals)] = ts
        print(f"  {cfg}: " + ", ".join(f"{t:.1f}" for t in ts.values()) + f" | sum {sum(ts.values()):.1f} us",
              flush=True)
    gemv.CFG.clear()
    gemv.CFG.update(default)
    for name in SHAPES:
        best = min(total, key=lambda v: total[v][name])
        print(f"BEST {name}: {dict(zip(space, best))} {total[best][name]:.1f} us "
              f"({cases[name][2] / total[best][name] / 1e3:.0f} GB/s)")
    best = min(total, key=lambda v: sum(total[v].values()))
    print(f"BEST overall: {dict(zip(space, best))} sum {sum(total[best].values()):.1f} us")


if __name__ == "__main__":
    main()
