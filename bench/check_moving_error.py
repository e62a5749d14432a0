"""The four bf16 cases of tests/test_triton_gla.py::test_backward_vs_autograd whose error came
and went on the H200 (K = V = 128, T = 300: BENCHMARKS section 1), run REPEAT times in one
process: each gradient's rel. RMS error against the float64 recurrence, and where the worst
(batch, token, head) row of it sits. Identical inputs every time, so a figure that changes
between repeats is the GPU's doing (a race, a read of memory nothing wrote), not the inputs'.

    python3 bench/check_moving_error.py [--repeat 3] [--cases chunk-mixed,...] [--intra-stages N]

Run it alone, then beside a loaded GPU (another process's tests or matmuls), and under
``compute-sanitizer --tool racecheck|memcheck`` with ``--repeat 1``. It found the cause
(2026-12-03): the backward's intra kernel with two pipeline stages races on the H200 under
load (dk up to 0.14, dg up to 0.22 off: 17 of 24 runs, every case but the mixed-gate one);
chunk.CFG now gives it one stage (0 of 24). ``--intra-stages 2`` brings the old launch back, to check a
new Triton.
"""
import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
if not torch.cuda.is_available():
    import conftest  # noqa: E402,F401  (the interpreter's bf16 mends)

from test_triton_gla import backward_case, grads_ref, rel  # noqa: E402

CASES = {"chunk-mixed": ("chunk", "mixed"), "recurrent-gla": ("recurrent", "gla"),
         "chunk-weak": ("chunk", "weak"), "chunk-gla": ("chunk", "gla")}


def worst_row(x, r):
    """(batch, token, head) of the largest error row, and that row's share of the squared error."""
    d = (x.detach().cpu().double() - r).pow(2)
    if d.dim() == 4 and d.shape[1] > 4:  # [B, T, H, D]
        per = d.sum(-1)
        i = int(per.argmax())
        b, t, h = i // (per.shape[1] * per.shape[2]), (i // per.shape[2]) % per.shape[1], i % per.shape[2]
        return f"b{b} t{t} h{h} ({per.max().item() / d.sum().clamp_min(1e-300).item():.0%})"
    return "-"


REFS = {}  # (op, gates, T, K, V) -> the float64 reference: the slow part, made once per case


def run(op, gates, T=300, K=128, V=128):
    ins, o, ref_args = backward_case(op, torch.bfloat16, T, gates, K, V)
    if (op, gates, T, K, V) not in REFS:
        REFS[op, gates, T, K, V] = grads_ref(*ref_args)
    ro, _, rg = REFS[op, gates, T, K, V]
    out = [f"o {rel(o, ro):.2e}"]
    for name, x, r in zip("q k v g h0".split(), ins, rg):
        out.append(f"d{name} {rel(x.grad, r):.2e} [{worst_row(x.grad, r)}]")
    return ", ".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--intra-stages", type=int, help="pipeline stages of the backward's intra kernel "
                    "(chunk.CFG has 1; 2 raced on the H200 under load)")
    a = ap.parse_args()
    if a.intra_stages:
        from regla_torch.ops.triton import chunk as C
        C.CFG["intra"]["num_stages"] = a.intra_stages
        C._cfg.cache_clear()
    for name in a.cases.split(","):
        for i in range(a.repeat):
            print(f"{name} #{i}: {run(*CASES[name])}", flush=True)


if __name__ == "__main__":
    main()
