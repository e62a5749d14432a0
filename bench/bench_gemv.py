"""Decode-time projections on CUDA: regla's grouped Triton GEMV (norm, gating, residual folded in)
against torch + cuBLAS.

    python bench/bench_gemv.py [--tune] [--rows 1]

Shapes are one layer of the 1.37B GLA model of bench_generate.py (hidden 2048): the grouped
input projections (q, k, v, gate low-rank, output gate: 1024+1024+2048+16+2048 rows) after
the block's RMSNorm, the MLP's gate and up (2 x 5632) after its RMSNorm, o (2048) of the
attention output's per-head RMSNorm times silu(output gate) plus the residual, down (2048 x 5632) of silu(gate) * up plus the residual, and the 32000-row head
after the final norm; the torch side runs the norm, gating and add as their own kernels. Each shape
has 24 copies of its weights (one per layer, as in a step: none comes from L2) called back to
back in one CUDA graph; then a whole step's projections in their order, and the same bytes read
by one call (no kernel boundaries) and copied once; the step with plain launches and with
programmatic dependent launch (the default on Hopper, which the per-shape lines use), with
and without each program's first weight tile loaded before the wait, and with the next kernel
launched before the wait (``_common.LAUNCH_FIRST``, the default) or after it. GB/s
counts the weight bytes. ``--tune``
times launch shapes and prints the best per shape and the best overall.
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {  # name: (row counts of the grouped weights, K, what is folded in)
    "in-proj (5 weights)": ([1024, 1024, 2048, 16, 2048], 2048, "norm"),
    "gate+up (2)": ([5632, 5632], 2048, "norm"),
    "o": ([2048], 2048, "head+residual"),  # 4 heads of 512: per-head RMSNorm, silu(gate)
    "down": ([2048], 5632, "glu+residual"),
    "head": ([32000], 2048, "norm"),
}


LAYERS = 24  # weight copies per shape: a step reads 24 layers' weights, none from L2


def case(ns, K, fold, rows):
    """Inputs, our calls and the torch they replace (RMSNorm / silu-gating / residual add as
    separate kernels, one cuBLAS call per weight), one call per layer's copy of the weights."""
    import torch.nn.functional as F

    from regla_torch.ops.triton import gemv
    x = torch.randn(rows, 2 * K if "glu" in fold else K, device="cuda", dtype=torch.bfloat16)
    layers = [[torch.randn(n, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for n in ns] for _ in range(LAYERS)]
    nw = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
    res = torch.randn(rows, sum(ns), device="cuda", dtype=torch.bfloat16) if "residual" in fold else None
    D = 512  # the attention output's head size ("head" fold)
    gate = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    hw = nw[:D]

    def ref(ws):
        h = x
        if fold == "norm":
            h = F.rms_norm(h.float(), (K,), nw.float(), 1e-6).to(h.dtype)
        if "head" in fold:
            h = F.rms_norm(h.view(rows, -1, D).float(), (D,), hw.float(), 1e-6).to(h.dtype).flatten(1)
            h = h * F.silu(gate)
        if "glu" in fold:
            a, b = h.chunk(2, -1)
            h = F.silu(a) * b
        ys = [F.linear(h, w) for w in ws]
        return ys[0] + res if res is not None else torch.cat(ys, -1)

    def ours(ws):
        if "head" in fold:
            return gemv.grouped_gemv(x, ws, hw, 1e-6, False, res, head_dim=D, gate=gate)
        return gemv.grouped_gemv(x, ws, nw if fold == "norm" else None, 1e-6, "glu" in fold, res)
    return [lambda ws=ws: ours(ws) for ws in layers], [lambda ws=ws: ref(ws) for ws in layers], sum(ns) * K * 2


def graph_us(calls):
    """Microseconds per call of ``calls`` replayed back to back as one CUDA graph."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(lambda: [f() for f in calls], rep=20, return_mode="median") * 1e3 / len(calls)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--stages", type=int, nargs="+", default=[1], help="pipeline stages --tune tries")
    ap.add_argument("--sweeps", type=int, default=2, choices=[1, 2], help="--tune's passes (2: opposite orders)")
    ap.add_argument("--no-wait", action="store_true",
                    help="the GEMVs' grid dependency wait compiled out: what the PDL lines cost with no data "
                         "dependency between launches (here every call reads the same x, so outputs stay right)")
    a = ap.parse_args()
    from regla_torch.ops.triton import _common, gemv
    if a.no_wait:  # before the first launch compiles the kernel, which looks the name up then
        import triton

        @triton.jit
        def _no_wait():
            pass
        _common.gdc_wait = _no_wait  # in _common.pdl_wait
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, rows {a.rows}; us per call, each call "
          f"on its own copy of the weights ({LAYERS} copies, replayed as one CUDA graph)")
    cases = {}
    for name, (ns, K, fold) in SHAPES.items():
        torch.manual_seed(0)
        ours, ref, nbytes = cases[name] = case(ns, K, fold, a.rows)
        r, o = ref[0](), ours[0]()
        err = ((o.float() - r.float()).norm() / r.float().norm()).item()
        t_ref, t_our = graph_us(ref), graph_us(ours)
        gb = nbytes / 1e9
        print(f"{name:20s} {gb * 1e3:6.1f} MB + {fold:12s} torch {t_ref:6.1f} us ({gb / t_ref * 1e6:5.0f} GB/s)"
              f"  ours {t_our:6.1f} us ({gb / t_our * 1e6:5.0f} GB/s)"
              f"  rel err {err:.1e}", flush=True)
    # a step's order: each layer's four projections, then the head (x stays put: this times
    # the weight reads, and how consecutive launches overlap)
    order = ["in-proj (5 weights)", "gate+up (2)", "o", "down"]
    seq = lambda side: [cases[n][side][i] for i in range(LAYERS) for n in order] + [cases["head"][side][0]]
    nbytes = LAYERS * sum(cases[n][2] for n in order) + cases["head"][2]
    n = len(seq(0))
    t_ref = graph_us(seq(1)) * n
    print(f"a step's {n} projections, {nbytes / 1e9:.2f} GB: torch {t_ref:.0f} us ({nbytes / t_ref / 1e3:.0f} GB/s)",
          flush=True)
    # ours with each launch plain, and with programmatic dependent launch (each GEMV starts
    # while the one before finishes; the default where the GPU has it)
    for pdl, early, first, tag in (
            (False, False, False, "plain launches"), (True, False, False, "PDL"),
            (True, True, False, "PDL, first weight tile before the wait"),
            (True, True, True, "PDL, early tile, next kernel launched before the wait")):
        if pdl and not _common.pdl_supported(torch.device("cuda")):
            print(f"  ours, {tag}: not supported here", flush=True)
            continue
        _common.PDL, gemv.EARLY, _common.LAUNCH_FIRST = pdl, early, first
        t_our = graph_us(seq(0)) * n
        errs = []
        for name in order + ["head"]:
            ours, ref, _ = cases[name]
            r, o = ref[0]().float(), ours[0]().float()
            errs.append(((o - r).norm() / r.norm()).item())
        print(f"  ours, {tag}: {t_our:.0f} us ({nbytes / t_our / 1e3:.0f} GB/s), max rel err {max(errs):.1e}",
              flush=True)
    _common.PDL, gemv.EARLY, _common.LAUNCH_FIRST = None, True, True
    # what the step's reads cost without kernel boundaries: the same bytes as one GEMV of
    # hidden-wide rows (this kernel's steady rate), and as one device-to-device copy
    big = torch.randn(nbytes // (2 * 2048), 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(a.rows, 2048, device="cuda", dtype=torch.bfloat16)
    t_one = graph_us([lambda: gemv.grouped_gemv(x, [big])])
    dst = torch.empty_like(big)
    t_copy = graph_us([lambda: dst.copy_(big)])
    print(f"the same {big.numel() * 2 / 1e9:.2f} GB in one call: ours {t_one:.0f} us "
          f"({big.numel() * 2 / t_one / 1e3:.0f} GB/s); a copy (read + write) {t_copy:.0f} us "
          f"({2 * big.numel() * 2 / t_copy / 1e3:.0f} GB/s moved)", flush=True)
    del big, dst
    if not a.tune:
        return
    space = dict(BN=[4, 8, 16, 32, 64], BK=[256, 512, 1024, 2048], num_warps=[4, 8], num_stages=a.stages)
    total = {}
    default = list(gemv.CFGS)
    configs = list(itertools.product(*space.values()))
    for sweep in (configs, configs[::-1])[:a.sweeps]:  # twice, in opposite orders: keep each one's best
        for vals in sweep:
            cfg = dict(zip(space.keys(), vals))
            gemv.CFGS[:] = [(lambda N, K: True, cfg)]
            try:
                ts = {name: graph_us(c[0]) for name, c in cases.items()}
            except Exception as e:  # noqa: BLE001 (a shape the compiler refuses: skip it)
                print(f"  {cfg}: {type(e).__name__}", flush=True)
                continue
            old = total.get(vals, ts)
            total[vals] = {k: min(ts[k], old[k]) for k in ts}
            print(f"  {cfg}: " + ", ".join(f"{t:.1f}" for t in ts.values()) + f" | sum {sum(ts.values()):.1f} us",
                  flush=True)
    gemv.CFGS[:] = default
    for name in SHAPES:
        best = min(total, key=lambda v: total[v][name])
        print(f"BEST {name}: {dict(zip(space, best))} {total[best][name]:.1f} us "
              f"({cases[name][2] / total[best][name] / 1e3:.0f} GB/s)")
    best = min(total, key=lambda v: sum(total[v].values()))
    print(f"BEST overall: {dict(zip(space, best))} sum {sum(total[best].values()):.1f} us")


if __name__ == "__main__":
    main()
