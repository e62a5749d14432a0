"""Where the Triton chunk op's bf16 backward goes wrong: bf16 against the same op in fp32, per
block of 32 key channels, at GSA's pass-two inputs, under variations (CUDA; off CUDA the Triton
interpreter, with the bf16 mends of tests/conftest.py).

    python3 bench/check_bf16_chunk.py [--cases base,plain,...]

On the H200 (triton 3.6) ``tests/test_triton_gla.py::test_gsa_packed_forward_backward[bfloat16]``
gives the slot weights a gradient 3,461x off in channels 32-63, deterministically, while the bf16
backward cases at K = V = 128 pass. The inputs here are that test's second pass: softmax
probabilities as q, slot weights s = 1 - exp(g) as k, packed rows of 130, 1, 200 and 17 tokens,
K = V = 64, two slot channels with log gates of -10 to -1e4 (so key block 0 takes the exact
sub-chunk path and block 1 the fast path). Each case prints the rel. RMS error of o, dv, and of
dq, dk, dg per key block; a case whose dk is right points at what the fault needs.
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
    "bk64": ("gsa", True, True, (64, 64), {"BK_QK": 64}),
    "exact": ("gsa", True, True, (64, 64), {"SPAN": -1.0}),
    "fp32-states": ("gsa", True, True, (64, 64), {"state_dtype": lambda d: torch.float32}),
    "rand-weak-plain": ("rand", False, False, (64, 64), {}),
    "k128": ("gsa", True, True, (128, 128), {}),
    "k64-v128": ("gsa", True, True, (64, 128), {}),
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
    """Set chunk.py's globals (``BK_QK``: the intra kernel's key block) and return their old values."""
    old = {}
    for key, val in patch.items():
        if key == "BK_QK":
            old[key], C.CFG["intra"]["BK_QK"] = C.CFG["intra"]["BK_QK"], val
        else:
            old[key] = getattr(C, key)
            setattr(C, key, val)
    C._cfg.cache_clear()
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    a = ap.parse_args()
    lengths = [130, 1, 200, 17] if DEV == "cuda" else [40, 1, 70, 17]
    print(f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU (Triton interpreter)'}, "
          f"rows {lengths}, H {H}; rel. RMS of bf16 against fp32, per key block of 32", flush=True)
    for name in a.cases.split(","):
        run(name, lengths)


if __name__ == "__main__":
    main()
