"""What the tests against fla's GLA op share: the runners of our ops (``run_torch``, ``run_mlx``),
and the inputs of the fla op fixtures (tests/fixtures/fla_ops), built here and on the GPU machine
alike: numpy's default generator gives the same float64 draws on every platform, and the cast
to fp32 or bf16 rounds the same way in torch everywhere, so a fixture need only hold fla's
outputs.

Gates: weak ones (fla's ``logsigmoid(randn)``, shifted: ~-0.1 a token, so a chunk of 64 decays
by far less than the 2^96 of our kernels' fast path) except in tokens 64..127 of every row, which
decay by 1.5..3 a token (~140 bits a chunk: our exact sub-chunk path), and a -10 every 41st
token. Both of our kernel paths and their boundary run in every case.
"""
import numpy as np
import pytest
import torch

# name: (K, V, H, layout, seeds for fp32 and bf16) with layout "rows" (B=2, T=130: two chunks
# and 2 tokens) or "packed" (B=1, T=260, three segments whose chunks straddle the strong gates).
# The committed fixtures were made from these seeds: a new case takes new ones.
CASES = {
    "k64v64_rows": (64, 64, 1, "rows", (7, 6)),
    "k64v64_packed": (64, 64, 1, "packed", (5, 4)),
    "k128v128_rows": (128, 128, 1, "rows", (1, 0)),
    "k32v64_rows": (32, 64, 2, "rows", (3, 2)),
}
DTYPES = ("float32", "bfloat16")
CU_SEQLENS = [0, 70, 200, 260]


def fixture_names():
    return [f"{case}_{dtype}" for case in CASES for dtype in DTYPES]


def inputs(name):
    """(q, k, v, g, h0, do, dht, cu_seqlens, dtype) as float64 numpy arrays; q, k, v, g, do are to
    be cast to ``dtype`` (fla's and our ops take them so), h0 and dht stay fp32 (states are)."""
    case, dtype = name.rsplit("_", 1)
    K, V, H, layout, seeds = CASES[case]
    B, T, cu = (2, 130, None) if layout == "rows" else (1, 260, CU_SEQLENS)
    N = B if cu is None else len(cu) - 1
    rng = np.random.default_rng(seeds[DTYPES.index(dtype)])
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    v = rng.standard_normal((B, T, H, V))
    g = -np.logaddexp(0.0, -(rng.standard_normal((B, T, H, K)) + 2.0))  # logsigmoid(x + 2)
    g[:, 64:128] = -rng.uniform(1.5, 3.0, (B, 64, H, K))
    g[:, 17::41] = -10.0
    h0 = rng.standard_normal((N, H, K, V))
    do = rng.standard_normal((B, T, H, V))
    dht = rng.standard_normal((N, H, K, V))
    return q, k, v, g, h0, do, dht, cu, dtype


def run_torch(op, q, k, v, g, h0, do, dht, cu):
    """op: "chunk" / "recurrent" through the dispatching ops (Triton on CUDA, plain torch on
    CPU), or "chunk-interpreter" / "recurrent-interpreter": the Triton ops on CPU tensors.
    Returns o, the final state and the gradients of q, k, v, g and h0."""
    if op.endswith("-interpreter"):
        from regla_torch.ops.triton import chunk_gla, fused_recurrent_gla
    else:
        from regla_torch.ops import chunk_gla, fused_recurrent_gla
    f = fused_recurrent_gla if op.startswith("recurrent") else chunk_gla
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=q.device)
    o, ht = f(*leaves[:4], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu_t)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return (o, ht) + tuple(x.grad for x in leaves)


def run_mlx(q, k, v, g, h0, do, dht, cu):
    """The plain MLX chunk op on the same inputs (torch tensors in and out), by mx.vjp."""
    mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install '.[mlx]')")
    from regla_mlx.ops import chunk_gla
    m = lambda x: mx.array(x.cpu().numpy())  # noqa: E731
    ins = [m(x) for x in (q, k, v, g, h0)]

    def f(q_, k_, v_, g_, h0_):
        return chunk_gla(q_, k_, v_, g_, initial_state=h0_, output_final_state=True, cu_seqlens=cu)

    (o, ht), grads = mx.vjp(f, ins, [m(do), m(dht)])
    return tuple(torch.from_numpy(np.array(x)) for x in (o, ht, *grads))
