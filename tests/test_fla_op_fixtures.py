"""Our chunk op against fla's own ``chunk_gla`` outputs and gradients (tests/fixtures/fla_ops,
made on an H200 by fla 0.6.0 with tests/fixtures/make_fla_ops.py), in fp32 and bf16, at head
dims 32 to 128, plain and packed rows, weak and strong gates (tests/helpers_fla_ops.py).

fla's error against the float64 recurrence of the same rounded inputs is the yardstick: ours
must be within twice it of that recurrence, and within three times it of fla's own output (plus
a floor: 1e-5 in fp32, MATH.md's bound; 2e-3 in bf16, about one rounding). fla's own error must be small too (FLA_MAX: at most 1.0e-6 in fp32 and
2.4e-3 in bf16 were measured), else the yardstick would grow with a misreading shared by our spec
and our backends. Such a misreading fails there or in the second bound; a kernel that computes
garbage in one precision (as Triton 3.6 did in bf16 at K = V = 64: BENCHMARKS section 1) fails both.

On CUDA the Triton kernels run in the fixture's dtype. Without CUDA the fp32 fixtures run on the
plain torch and MLX chunk ops and on the Triton kernels in the interpreter, the bf16 ones on the
Triton kernels in the interpreter (bf16 dots and rounding mended by conftest: it gave the H200's
figures to two digits, BENCHMARKS section 1; its tf32 dots are exact fp32, so a bf16 error from
tf32 rounding shows on the GPU only).
"""
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rel_rms
from helpers_fla_ops import fixture_names, inputs, run_mlx, run_torch
from regla_torch.ops.naive import recurrent_gla_reference

FIXTURES = Path(__file__).parent / "fixtures" / "fla_ops"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
KEYS = ("o", "ht", "dq", "dk", "dv", "dg", "dh0")
FLOOR = {"float32": 1e-5, "bfloat16": 2e-3}
FLA_MAX = {"float32": 1e-5, "bfloat16": 5e-3}
CUDA = torch.cuda.is_available()


def test_fixtures_are_fla_s():
    assert MANIFEST["fla"] == "0.6.0" and MANIFEST["device"] != "cpu"
    assert MANIFEST["op"] == "fla.ops.gla.chunk_gla" and MANIFEST["fixtures"] == fixture_names()


def _cases():
    for name in fixture_names():
        if CUDA:
            ops = ["chunk"]
        elif name.endswith("float32"):
            ops = ["chunk", "chunk-interpreter", "chunk-mlx"]
        else:  # only the Triton kernels round bf16 as the GPU does; the CPU ops compute in fp32
            ops = ["chunk-interpreter"]
        for op in ops:
            yield pytest.param(name, op, id=f"{name}-{op}")


def _tensors(name):
    q, k, v, g, h0, do, dht, cu, dtype = inputs(name)
    dt = getattr(torch, dtype)
    dev = "cuda" if CUDA else "cpu"
    cast = lambda x, d: torch.tensor(x, dtype=torch.float32).to(d).to(dev)  # noqa: E731
    return [cast(x, dt) for x in (q, k, v, g)] + [cast(h0, torch.float32), cast(do, dt),
                                                   cast(dht, torch.float32)], cu


@pytest.mark.parametrize("name,op", list(_cases()))
def test_chunk_gla_against_fla(name, op):
    from safetensors.torch import load_file

    (q, k, v, g, h0, do, dht), cu = _tensors(name)
    fla = load_file(str(FIXTURES / f"{name}.safetensors"))
    ref = recurrent_gla_reference(*(x.cpu() for x in (q, k, v, g, h0, do, dht)), scale=q.shape[-1] ** -0.5,
                                  cu_seqlens=cu)
    run = run_mlx if op == "chunk-mlx" else functools.partial(run_torch, op)
    ours = [x.detach().float().cpu().numpy() for x in run(q, k, v, g, h0, do, dht, cu)]
    dtype = name.rsplit("_", 1)[1]
    floor = FLOOR[dtype]
    report, bad = [], []
    for key, r, x in zip(KEYS, ref, ours):
        f = fla[key].double().numpy()
        r = r.numpy()
        assert x.shape == f.shape == r.shape, key
        e_fla, e_ours, e_direct = rel_rms(f, r), rel_rms(x, r), rel_rms(x, f)
        report.append(f"{key}: fla {e_fla:.1e}, ours {e_ours:.1e}, ours vs fla {e_direct:.1e}")
        if not (e_fla <= FLA_MAX[dtype] and np.isfinite(x).all() and e_ours <= 2 * e_fla + floor
                and e_direct <= 3 * e_fla + floor):
            bad.append(key)
    print(f"{name} {op}:\n" + "\n".join(report))  # shown with -rP
    assert not bad, f"{bad} off (rel. RMS against the float64 recurrence):\n" + "\n".join(report)
