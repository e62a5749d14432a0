"""Gradient precision of our Triton chunk op beside fla's, against a float64 recurrence.

    python bench/bench_grad_precision.py [--fla-configs 1] [--shape 2,1024,8,128] [--out FILE]

One row per input precision (issue #24): B=2, T=1024, H=8, D=128; q, k, v uniform in [0, 1)
in the row's dtype, log gates ``logsigmoid(rand) / normalizer`` in g's dtype, an fp32
initial state (uniform), an output gradient (randn, v's dtype) and a final-state gradient
(randn, fp32). Both ops get the same inputs in one run. Error: rel. RMS
``||x - ref||_rms / ||ref||_rms`` of o, the final state and the five gradients, where ref is
the float64 recurrence of the same (rounded) inputs, held in the dtype autograd gives the
op's result (o in v's dtype, each gradient in its leaf's dtype), as fla's own op tests get
their reference. A result within half an ulp of the exact value then scores 0; the scores
measure how often, and how far, rounding lands on a different half-precision value.
fla runs with its default fp32 dot precision (tf32) and its autotuner cut to
``--fla-configs`` configurations (precision does not depend on the launch configuration).
Without CUDA both run in Triton's interpreter (small --shape only; no tf32 rounding there,
and bf16 dots are wrong in it: a smoke test, not a measurement).
"""
import argparse
import datetime
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (q, k, v dtype, g dtype, gate normalizer)
ROWS = [("float16", "float16", 0.1), ("float16", "float32", 0.1), ("bfloat16", "float32", 0.1),
        ("bfloat16", "float32", 1.0), ("float32", "float32", 0.1)]
NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "dh0")


def inputs(shape, dt, gdt, norm, seed=42):
    B, T, H, D = shape
    gen = torch.Generator(device=DEV).manual_seed(seed)
    rand = lambda dtype, *s: torch.rand(s, generator=gen, device=DEV, dtype=dtype)
    q, k, v = (rand(dt, B, T, H, D) for _ in range(3))
    g = torch.nn.functional.logsigmoid(rand(gdt, B, T, H, D)) / norm
    h0 = rand(torch.float32, B, H, D, D)
    do = torch.randn(B, T, H, D, generator=gen, device=DEV, dtype=dt)
    dht = torch.randn(B, H, D, D, generator=gen, device=DEV)
    return q, k, v, g, h0, do, dht


def run(op, q, k, v, g, h0, do, dht):
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, ht = op(*leaves[:4], initial_state=leaves[4], output_final_state=True)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return [o, ht] + [x.grad for x in leaves]


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fla-configs", type=int, default=1)
    ap.add_argument("--shape", default="2,1024,8,128", help="B,T,H,D")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    from bench_ops import limit_autotune

    from regla_torch.ops.naive import recurrent_gla_reference
    from regla_torch.ops.triton import chunk_gla
    limit_autotune(args.fla_configs)
    import fla.ops.gla as fla

    lines = []
    out = lambda s: (print(s, flush=True), lines.append(s))
    device = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (Triton interpreter)"
    out(f"device: {device}, torch {torch.__version__}, triton "
        f"{__import__('triton').__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    out(f"B, T, H, D = {shape}; rel. RMS against the float64 recurrence, ours / fla")
    out("")
    out("| q, k, v / g / normalizer | " + " | ".join(NAMES) + " | worst ours/fla (dq, dk, dv, dg) |")
    out("|---|" + "---|" * (len(NAMES) + 1))
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    for dt, gdt, norm in ROWS:
        x = inputs(shape, getattr(torch, dt), getattr(torch, gdt), norm)
        ref = recurrent_gla_reference(*x)
        dtypes = [x[2].dtype, torch.float32, x[0].dtype, x[1].dtype, x[2].dtype, x[3].dtype, x[4].dtype]
        ref = [r.to(d) for r, d in zip(ref, dtypes)]
        ours = [rel(a, r) for a, r in zip(run(chunk_gla, *x), ref)]
        theirs = [rel(a, r) for a, r in zip(run(fla.chunk_gla, *x), ref)]
        worst = max(a / max(b, 1e-12) for a, b in zip(ours[2:6], theirs[2:6]))
        cells = " | ".join(f"{a:.1e} / {b:.1e}" for a, b in zip(ours, theirs))
        out(f"| {short[dt]} / {short[gdt]} / {norm:g} | {cells} | {worst:.2f} |")
        del x, ref
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
