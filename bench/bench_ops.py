"""Benchmark regla's Triton GLA kernels against fla and SDPA (CUDA only).

    python bench/bench_ops.py [--shapes all|small] [--fla-configs 6] [--no-fla] [--out FILE]
                              [--baseline OLD_CHUNK_PY]

Times are medians of triton.testing.do_bench (ms). fla's autotuner is limited to
--fla-configs configurations per kernel, spread over its list (its full search takes
minutes per shape); fla's full-autotune numbers on the same machine are in ANCHORS.md.
--baseline times another revision's regla_torch/ops/triton/chunk.py (e.g. from
`git show REV:regla_torch/ops/triton/chunk.py`) beside the current one in the same run, with
GLA gates (logsigmoid/16, the fast path) and ReGLA-strength gates (logsigmoid, no
normalizer: the exact sub-chunk path).
Memory floor: the bytes the op must move (fwd: read q, k, v in bf16 and g in fp32,
write o; fwd+bwd adds reading q, k, v, g, do and writing dq, dk, dv, dg) over 4.3 TB/s.
"""
import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(8, 1024, 8, 64), (4, 2048, 16, 128), (4, 4096, 64, 128), (1, 8192, 96, 128),
          (2, 16384, 16, 128), (8, 2048, 32, 256)]
BW = 4.3e12


def limit_autotune(n):
    """Keep n configs (evenly spread) in every triton autotuner created from now on."""
    import triton.runtime.autotuner as at
    orig = at.Autotuner.__init__

    def init(self, fn, arg_names, configs, *a, **kw):
        if n and len(configs) > n:
            step = len(configs) / n
            configs = [configs[int(i * step)] for i in range(n)]
        orig(self, fn, arg_names, configs, *a, **kw)

    at.Autotuner.__init__ = init


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def load_chunk_gla(path):
    """chunk_gla of another revision's chunk.py, imported as a sibling of the current one (it
    shares _common)."""
    import importlib.util
    name = "regla_torch.ops.triton._chunk_baseline"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.chunk_gla


def compare_baseline(path, shapes, bench, out):
    from regla_torch.ops.triton import chunk_gla
    base = load_chunk_gla(path)
    out("")
    out(f"Against {path} (same run; bf16 q, k, v, fp32 gates; ms):")
    out("")
    out("| B | T | H | D | gates | fwd | baseline fwd | f+b | baseline f+b | f+b / baseline |")
    out("|" + "---|" * 10)
    for B, T, H, D in shapes:
        for gates, norm in (("GLA (/16)", 16.0), ("ReGLA (/1)", 1.0)):
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / norm
            do = torch.randn_like(v)
            leaves = [x.requires_grad_() for x in (q, k, v, g)]
            res = {}
            for key, op in (("new", chunk_gla), ("base", base)):
                with torch.no_grad():
                    res[key + "_f"] = bench(lambda: op(q, k, v, g))
                res[key + "_fb"] = bench(lambda: op(q, k, v, g)[0].backward(do), leaves)
            out(f"| {B} | {T} | {H} | {D} | {gates} | {res['new_f']:.3f} | {res['base_f']:.3f} "
                f"| {res['new_fb']:.3f} | {res['base_fb']:.3f} | {res['new_fb'] / res['base_fb']:.3f} |")


def tune(shape, kernels=None):
    """Time each chunk kernel alone under alternative launch shapes; keep the best."""
    import itertools

    from triton.testing import do_bench

    from regla_torch.ops.triton import chunk as C
    B, T, H, D = shape
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, B * T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    g = torch.nn.functional.logsigmoid(torch.randn(1, B * T, H, D, device="cuda")) / 16
    ch = C.chunks(B, T, "cuda")
    gcs, kd, qg = C._prep(q, k, g, ch, True)
    h, dh, _ = C._bwd_scans(kd, v, qg, do, gcs, None, None, 1.0, ch)
    calls = {
        "scan": lambda: C._bwd_scans(kd, v, qg, do, gcs, None, None, 1.0, ch),
        "o": lambda: C._fwd_o(q, k, v, gcs, h, 1.0, ch),
        "intra": lambda: C._bwd_intra(q, k, v, g, gcs, h, do, dh, 1.0, ch),
    }
    space = {
        "scan": dict(BK=[64, 128], BV=[32, 64], num_warps=[4, 8], num_stages=[2, 3]),
        "o": dict(BK=[64, 128], BV=[64, 128], num_warps=[4, 8], num_stages=[2]),
        # one stage only: two raced on the H200 under load (chunk.CFG's comment), which a timing
        # on an idle GPU cannot see
        "intra": dict(BK_DV=[64], BV_DV=[64, 128], BK_QK=[32, 64], BV_QK=[32, 64], num_warps=[4, 8],
                      num_stages=[1]),
    }
    print(f"tune at {shape}: prep (gc, kd, qg) {do_bench(lambda: C._prep(q, k, g, ch, True), return_mode='median'):.3f} ms",
          flush=True)
    for name, sp in space.items():
        if kernels and name not in kernels:
            continue
        best = None
        for vals in itertools.product(*sp.values()):
            cfg = dict(zip(sp.keys(), vals))
            C.CFG[name] = cfg
            C._cfg.cache_clear()
            try:
                t = do_bench(calls[name], warmup=10, rep=40, return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
                continue
            print(f"  {name} {cfg}: {t:.3f} ms", flush=True)
            if best is None or t < best[0]:
                best = (t, cfg)
        C.CFG[name] = best[1]
        C._cfg.cache_clear()
        print(f"BEST {name} {best[1]} {best[0]:.3f} ms", flush=True)
    print("CFG =", C.CFG, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--fla-configs", type=int, default=6)
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tune", default=None, help="B,T,H,D: tune launch shapes there first")
    ap.add_argument("--tune-kernels", nargs="*", default=None, help="only these (scan, o, intra)")
    ap.add_argument("--baseline", default=None, help="another revision's chunk.py to time beside ours")
    args = ap.parse_args()
    if args.tune:
        tune(tuple(int(x) for x in args.tune.split(",")), args.tune_kernels)
    from triton.testing import do_bench, do_bench_cudagraph

    from regla_torch.ops.triton import chunk_gla, fused_recurrent_gla_step_
    fla = None
    if not args.no_fla:
        limit_autotune(args.fla_configs)
        try:
            import fla.ops.gla as fla
        except Exception as e:  # noqa: BLE001
            print("fla unavailable:", repr(e))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bench = lambda f, grads=None: do_bench(f, warmup=25, rep=100, grad_to_none=grads,
                                           return_mode="median")
    lines = []
    out = lambda s: (print(s, flush=True), lines.append(s))
    out(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    out("")
    out("| B | T | H | D | ours fwd | fla fwd | SDPA fwd | ours f+b | fla f+b | SDPA f+b "
        "| fla/ours f+b | SDPA/ours f+b | floor share fwd | floor share f+b | rel(ours,fla) |")
    out("|" + "---|" * 15)
    shapes = SHAPES if args.shapes == "all" else SHAPES[:2]
    for B, T, H, D in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16
        do = torch.randn_like(v)
        leaves = [x.requires_grad_() for x in (q, k, v, g)]
        n = B * T * H * D
        floor_f = n * (2 * 3 + 4 + 2) / BW * 1e3
        floor_fb = floor_f + n * (2 * 3 + 4 + 2 + 2 * 3 + 4) / BW * 1e3
        res = {}
        with torch.no_grad():
            res["ours_f"] = bench(lambda: chunk_gla(q, k, v, g))

        def ours_fb():
            chunk_gla(q, k, v, g)[0].backward(do)
        res["ours_fb"] = bench(ours_fb, leaves)
        err = float("nan")
        if fla is not None:
            try:
                with torch.no_grad():
                    res["fla_f"] = bench(lambda: fla.chunk_gla(q, k, v, g))
                    err = rel(chunk_gla(q, k, v, g)[0], fla.chunk_gla(q, k, v, g)[0])

                def fla_fb():
                    fla.chunk_gla(q, k, v, g)[0].backward(do)
                res["fla_fb"] = bench(fla_fb, leaves)
            except Exception as e:  # noqa: BLE001
                print("fla failed:", repr(e)[:300], flush=True)
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dot_ = do.transpose(1, 2).contiguous()
        sd = torch.nn.functional.scaled_dot_product_attention
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            with torch.no_grad():
                res["sdpa_f"] = bench(lambda: sd(qt, kt, vt, is_causal=True))
            res["sdpa_fb"] = bench(lambda: sd(qt, kt, vt, is_causal=True).backward(dot_),
                                   [qt, kt, vt])
        f = lambda key: f"{res[key]:.3f}" if key in res else "-"
        r = lambda a, b: f"{res[a] / res[b]:.2f}" if a in res and b in res else "-"
        out(f"| {B} | {T} | {H} | {D} | {f('ours_f')} | {f('fla_f')} | {f('sdpa_f')} "
            f"| {f('ours_fb')} | {f('fla_fb')} | {f('sdpa_fb')} | {r('fla_fb', 'ours_fb')} "
            f"| {r('sdpa_fb', 'ours_fb')} | {floor_f / res['ours_f']:.0%} "
            f"| {floor_fb / res['ours_fb']:.0%} | {err:.1e} |")

    if args.baseline:
        compare_baseline(args.baseline, shapes, bench, out)

    if not args.no_decode:
        out("")
        out("Decode, one step, H16 K=V=128, bf16 q/k/v, fp32 state (us; graph = CUDA-graph replay):")
        out("")
        out("| batch | ours | ours (graph) | fla fused_recurrent_gla | state floor |")
        out("|---|---|---|---|---|")
        for Bd in (1, 32):
            Hd, K = 16, 128
            q, k, v = (torch.randn(Bd, 1, Hd, K, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            g = torch.nn.functional.logsigmoid(torch.randn(Bd, 1, Hd, K, device="cuda")) / 16
            state = torch.randn(Bd, Hd, K, K, device="cuda")
            o = torch.empty_like(v)
            t_ours = bench(lambda: fused_recurrent_gla_step_(q, k, v, g, state, out=o)) * 1e3
            t_graph = do_bench_cudagraph(
                lambda: fused_recurrent_gla_step_(q, k, v, g, state, out=o), rep=100,
                return_mode="median") * 1e3
            t_fla = "-"
            if fla is not None:
                try:
                    st = state.clone()
                    t_fla = "%.1f" % (bench(lambda: fla.fused_recurrent_gla(
                        q, k, v, gk=g, initial_state=st, output_final_state=True)) * 1e3)
                except Exception as e:  # noqa: BLE001
                    print("fla decode failed:", repr(e)[:300], flush=True)
            floor = 2 * state.numel() * 4 / BW * 1e6
            out(f"| {Bd} | {t_ours:.1f} | {t_graph:.1f} | {t_fla} | {floor:.1f} |")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
