"""The Triton chunk op's bf16 backward against the same op in fp32, per block of 32 key channels,
at GSA's pass-two inputs, under variations (CUDA; off CUDA the Triton interpreter, with the bf16
mends of tests/conftest.py).

    python3 bench/check_bf16_chunk.py [--cases base,bk32,...] [--stages]

It found a Triton 3.6 miscompile on the H200 (2026-12-03, BENCHMARKS section 1): at K = V = 64
in bf16 the dq/dk/dg part of the backward, with key blocks of 32 and its one value block, gave
dk and dg ~1e3 off (rel.) in every fast-path block, whatever the gates and inputs, plain or
packed rows, with bf16 or fp32 states; fp32, two value blocks (V = 128, K = 128) and key blocks
of 64 were right. ``_cfg`` now takes key blocks of 64 when there is one value block; the
``bk32`` case forces the old shape back, to check a new Triton. The inputs: softmax
probabilities as q, slot weights s = 1 - exp(g) as k, packed rows of 130, 1, 200 and 17 tokens,
K = V = 64, two slot channels with log gates of -10 to -1e4 (key block 0 takes the exact
sub-chunk path, block 1 the fast path). Each case prints the rel. RMS error of o, dv, and of dq,
dk, dg per key block. ``--stages`` runs the base case kernel by kernel (the states h and dh,
then the intra kernel with its own states and with the fp32 run's).
"""
import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

if not torch.cuda.is_available():  # the interpreter's bf16 dot and rounding need the tests' mends
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import conftest  # noqa: E402,F401

import regla_torch.ops.triton.chunk as C  # noqa: E402
from regla_torch.ops.triton import chunk_gla  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H = 4

# name: (inputs "gsa" or "rand", strong channels, packed rows, (K, V), what to patch in chunk.py)
CASES = {
    "base": ("gsa", True, True, (64, 64), {}),
    "rand": ("rand", True, True, (64, 64), {}),
    "weak": ("gsa", False, True, (64, 64), {}),
    "plain": ("gsa", True, False, (64, 64), {}),
    "bk32": ("gsa", True, True, (64, 64), {"BK_QK": 32}),
    "exact": ("gsa", True, True, (64, 64), {"SPAN": -1.0}),
    "fp32-states": ("gsa", True, True, (64, 64), {"state_dtype": lambda d: torch.float32}),
    "rand-weak-plain": ("rand", False, False, (64, 64), {}),
    "k128": ("gsa", True, True, (128, 128), {}),
    "k64-v128": ("gsa", True, True, (64, 128), {}),
    "k32": ("gsa", True, True, (32, 64), {}),  # its one key block holds the strong channels: exact path
    "k32-weak": ("gsa", False, True, (32, 64), {}),  # the fast path at K = 32 (faulty with blocks of 32)
    # test_backward_vs_autograd's "gla" inputs at K = V = 128 (dk 6.8e-2 off float64 at T = 300 on
    # the H200): key blocks of 32, two value blocks
    "k128-rand-weak-plain": ("rand", False, False, (128, 128), {}),
    "k128-rand-weak-plain-bk64": ("rand", False, False, (128, 128), {"BK_QK": 64}),
    "k128-rand-weak-plain-fp32-states": ("rand", False, False, (128, 128), {"state_dtype": lambda d: torch.float32}),
}


def inputs(kind, strong, lengths, K, V):
    T = sum(lengths)
    gen = torch.Generator().manual_seed(5)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, H, K, generator=gen)) / 8
    if strong:
        g[..., :2] = -10 - torch.rand(1, T, H, 2, generator=gen) * (1e4 - 10)
    if kind == "gsa":
        q, k = torch.softmax(torch.randn(1, T, H, K, generator=gen) * 2, -1), 1 - g.exp()
    else:
        q, k = torch.randn(1, T, H, K, generator=gen), torch.randn(1, T, H, K, generator=gen)
    return q, k, torch.randn(1, T, H, V, generator=gen), g, torch.randn(1, T, H, V, generator=gen)


def grads(q, k, v, g, do, dtype, cu):
    xs = [x.to(DEV, dtype if i < 3 else torch.float32).detach().clone().requires_grad_()
          for i, x in enumerate((q, k, v, g))]
    o, _ = chunk_gla(*xs, scale=1.0, cu_seqlens=cu)
    (o.float() * do.to(DEV)).sum().backward()
    return [o.float()] + [x.grad.float() for x in xs]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def patched(patch):
    """Set chunk.py's globals and return their old values; ``BK_QK`` forces the intra kernel's
    key block whatever ``_cfg`` would choose."""
    old = {}
    for key, val in patch.items():
        if key == "BK_QK":
            old["_cfg"] = C._cfg
            C._cfg = lambda name, K, V, scans=None, _f=C._cfg: (
                {**_f(name, K, V, scans), "BK_QK": val} if name == "intra" else _f(name, K, V, scans))
        else:
            old[key] = getattr(C, key)
            setattr(C, key, val)
    return old


def run(name, lengths):
    kind, strong, packed, (K, V), patch = CASES[name]
    old = patched(patch)
    try:
        q, k, v, g, do = inputs(kind, strong, lengths, K, V)
        cu = torch.tensor([0] + lengths).cumsum(0).to(DEV) if packed else None
        t = time.time()
        ref, got = grads(q, k, v, g, do, torch.float32, cu), grads(q, k, v, g, do, torch.bfloat16, cu)
        parts = []
        for n, a, b in zip(["o", "dq", "dk", "dv", "dg"], got, ref):
            if n in ("dq", "dk", "dg"):
                parts.append(f"{n} " + "/".join(f"{rel(a[..., i:i + 32], b[..., i:i + 32]):.1e}"
                                                for i in range(0, a.shape[-1], 32)))
            else:
                parts.append(f"{n} {rel(a, b):.1e}")
        print(f"{name:16s} " + "  ".join(parts) + f"  ({time.time() - t:.0f} s)", flush=True)
    finally:
        patched(old)


def blocks(a, b, dim):
    """rel. RMS of a against b per block of 32 along dim (the key channels)."""
    return "/".join(f"{rel(x, y):.1e}" for x, y in zip(a.float().split(32, dim), b.float().split(32, dim)))


def stages(lengths):
    """The base case stage by stage: the backward's states h and dh (bf16 against fp32), then
    the intra kernel's dk from bf16 inputs with its own states and with the fp32 run's states
    rounded to bf16: which of the two kernels goes wrong."""
    q, k, v, g, do = inputs("gsa", True, lengths, 64, 64)
    T = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(DEV)
    ch = C.chunks(1, T, DEV, cu)
    res = {}
    for dt in (torch.float32, torch.bfloat16):
        x = [t.to(DEV, dt).contiguous() for t in (q, k, v, do)] + [g.to(DEV).contiguous()]
        gcs, kd, qg = C._prep(x[0], x[1], x[4], ch, store_qg=True)
        h, dh, _ = C._bwd_scans(kd, x[2], qg, x[3], gcs, None, None, 1.0, ch)
        dqkvg = C._bwd_intra(x[0], x[1], x[2], x[4], gcs, h, x[3], dh, 1.0, ch)
        res[dt] = x, gcs, h, dh, dqkvg
    x, gcs, h, dh, (dq, dk, dv, dg) = res[torch.bfloat16]
    _, _, h32, dh32, (dq32, dk32, dv32, dg32) = res[torch.float32]
    print(f"stages: h {blocks(h, h32, 2)}  dh {blocks(dh, dh32, 2)}", flush=True)
    print(f"stages: own states     dq {blocks(dq, dq32, 3)}  dk {blocks(dk, dk32, 3)}  dv {rel(dv.float(), dv32):.1e}"
          f"  dg {blocks(dg, dg32, 3)}", flush=True)
    dq, dk, dv, dg = C._bwd_intra(x[0], x[1], x[2], x[4], gcs, h32.bfloat16(), x[3], dh32.bfloat16(), 1.0, ch)
    print(f"stages: fp32 states    dq {blocks(dq, dq32, 3)}  dk {blocks(dk, dk32, 3)}  dv {rel(dv.float(), dv32):.1e}"
          f"  dg {blocks(dg, dg32, 3)}", flush=True)
    bad = (dk.float() - dk32).abs().amax(-1)[0]  # [T, H]: the worst channel of each row
    top = bad.flatten().topk(8)
    print("stages: worst dk rows (row, head, |err|): " + ", ".join(
        f"({i // bad.shape[1]}, {i % bad.shape[1]}, {e:.2g})" for e, i in zip(top.values.tolist(), top.indices.tolist())),
        flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    ap.add_argument("--stages", action="store_true", help="only the base case, kernel by kernel")
    a = ap.parse_args()
    unknown = set(a.cases.split(",")) - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    lengths = [130, 1, 200, 17] if DEV == "cuda" else [40, 1, 70, 17]
    print(f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU (Triton interpreter)'}, "
          f"rows {lengths}, H {H}; rel. RMS of bf16 against fp32, per key block of 32", flush=True)
    if a.stages:
        return stages(lengths)
    for name in a.cases.split(","):
        run(name, lengths)


if __name__ == "__main__":
    main()
