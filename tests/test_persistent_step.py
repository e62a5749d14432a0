"""The whole-step persistent decode kernel (regla_torch.ops.triton.persistent_step).

Its packing (which program streams which weight rows, in which order) is checked here on any
machine; the kernel itself is Gluon, which has no interpreter mode, so it runs only on a Hopper
GPU (the device machine): there a regla and a gla model's decode steps through it are compared
with the same model run in float64 on the CPU (regla's plain torch path, which tests/test_spec.py
holds to regla.spec), from the same state, with weak gates and with log gates down to -1e4."""
import numpy as np
import pytest
import torch

from regla import spec
from regla_torch.ops.triton.persistent_step import StepShape


@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("programs", [132, 80])
def test_every_weight_row_streamed_once_in_stage_order(refine, programs):
    sh = StepShape(2048, 4, 256, 512, 16, refine, 5632, 32000, 3, programs) if programs == 132 else \
        StepShape(1024, 4, 128, 256, 16, refine, 2816, 1000, 2, programs)
    assert not sh.problems()
    idx, rows, start, a0, na, h0 = sh.layout()
    per_layer = 2 * sh.h * sh.dk + 2 * sh.h * sh.dv + (sh.a_rows - 2 * sh.h * sh.dk) + sh.h * sh.dv + 3 * sh.inner
    total = sh.layers * per_layer + sh.vocab
    assert torch.equal(torch.sort(idx).values, torch.arange(total))  # each row once
    assert rows.shape == (programs, sh.blocks) and int(rows.max()) <= 16
    assert torch.equal(start[1:], torch.cumsum(rows.sum(1).long(), 0)[:-1]) and int(start[0]) == 0
    # stage A's rows split over the programs in order, each program's run as its table says
    assert int(na.sum()) == sh.a_rows and torch.equal(a0[1:].long(), torch.cumsum(na.long(), 0)[:-1])
    per = sh.layers * (4 + 3 * sh.nsub)
    for p in range(programs):
        r = rows[p].numpy()
        run = idx[int(start[p]):int(start[p]) + int(r.sum())].numpy()
        assert r[0] == na[p]
        assert list(r[1:4]) == ([16, 16, 16] if p < sh.slices else [0, 0, 0])
        b = int(r[0])  # the v rows of this program's slice come right after its A rows
        if p < sh.slices:
            assert np.array_equal(run[b:b + 16], 2 * sh.h * sh.dk + 16 * p + np.arange(16))
        assert int(r[per:].sum()) == int(h0[p + 1] - h0[p]) if p + 1 < programs else True


def test_shapes_it_does_not_take_say_why():
    assert StepShape(2048, 4, 256, 512, 16, True, 5632, 32000, 24, 132).problems() == []
    assert "hidden size 4096" in StepShape(4096, 4, 256, 512, 16, False, 11008, 32000, 2, 132).problems()[0]
    assert "key head size 64" in StepShape(1024, 8, 64, 128, 16, False, 2816, 1000, 2, 132).problems()[0]
    assert "gate rank 8" in StepShape(1024, 4, 128, 256, 8, False, 2816, 1000, 2, 132).problems()[0]
    # 128 value slices and 2064 stage-A rows need 129 programs
    assert "too few" in StepShape(2048, 4, 256, 512, 16, False, 5632, 32000, 2, 114).problems()[0]


def _emulate(step, args, tok, states):
    """The kernel's schedule in float64 on the CPU: every program's row blocks read from the
    packed copy in stream order and used as ``persistent_step._consumer`` uses them (A's rows by
    ``a0``/``na``; a slice's v, output gate and W_o^T rows and its state columns; the deferred
    head norm; the MLP's partial sums; the head's rows by ``h0``); the gate and maps by the
    model's own ``maps_and_gate``. The states are updated in place; returns the logits."""
    from regla_torch.model import maps_and_gate
    sh, m = step.shape, step.math
    H, DK, DV, R, per = sh.h, sh.dk, sh.dv, sh.r, 4 + 3 * sh.nsub
    w, blocks = step.w.double(), []
    for p in range(sh.programs):
        off, mine = int(step.start[p]), []
        for n in step.rows[p].tolist():
            mine.append(w[off:off + n])
            off += n
        blocks.append(mine)
    norm = lambda x, g: x * torch.rsqrt((x * x).mean() + m["eps"]) * g.double()  # noqa: E731
    silu = torch.nn.functional.silu
    x = step.emb[tok].double()
    for j in range(sh.layers):
        xn, qkr = norm(x, step.nw1[j]), torch.zeros(sh.a_rows, dtype=torch.float64)
        for p in range(sh.programs):
            qkr[int(step.a0[p]):int(step.a0[p]) + int(step.na[p])] = blocks[p][j * per] @ xn
        f = 2 * H * DK
        z = [(wt[j].double() @ qkr[f + i * R:f + (i + 1) * R] + b[j].double()).view(1, 1, H, DK)
             for i, (wt, b) in enumerate([(step.wf, step.bf), (step.wr, step.br)][:2 if sh.refine else 1])]
        S, m0 = states[j][0], states[j][1]
        q, k, g, m_last = maps_and_gate(args, qkr[:H * DK].view(1, 1, H, DK), qkr[H * DK:f].view(1, 1, H, DK), z[0],
                                        z[1] if sh.refine else None, None if m0 is None else m0.double())
        acc, ss = torch.zeros(H, sh.d, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
        for p in range(sh.slices):
            h, c = p // (DV // 16), slice(p % (DV // 16) * 16, p % (DV // 16) * 16 + 16)
            v, og = blocks[p][j * per + 1] @ xn, blocks[p][j * per + 2] @ xn
            s = g[0, 0, h].exp()[:, None] * S[0, h, :, c].double() + k[0, 0, h][:, None] * v[None]
            S[0, h, :, c] = s.to(S.dtype)
            o = (q[0, 0, h] * m["scale"]) @ s
            ss[h] += (o * o).sum()
            acc[h] += (o * step.nwo[j][c].double() * silu(og)) @ blocks[p][j * per + 3]
        if m0 is not None:
            m0.copy_(m_last)
        x = x + (torch.rsqrt(ss / DV + m["eps"])[:, None] * acc).sum(0)
        xn, mlp = norm(x, step.nw2[j]), torch.zeros(sh.d, dtype=torch.float64)
        for p in range(sh.programs):
            for b in range(j * per + 4, (j + 1) * per, 3):
                mlp += (silu(blocks[p][b] @ xn) * (blocks[p][b + 1] @ xn)) @ blocks[p][b + 2]
        x = x + mlp
    xn, logits = norm(x, step.nwf), torch.zeros(sh.vocab, dtype=torch.float64)
    for p in range(sh.programs):
        ho = int(step.h0[p])
        for b in range(sh.layers * per, sh.blocks):
            y = blocks[p][b] @ xn
            logits[ho:ho + len(y)] = y
            ho += len(y)
    return logits


@pytest.mark.parametrize("attn_type", ["regla", "gla"])
def test_packed_schedule_computes_the_model_step(attn_type):
    """On any machine: the packed weights and tables ``PersistentStep`` builds from a model
    (``generate.persistent_weights``), consumed in the kernel's order and decomposition, give
    the model's own decode step (float64, from the same state), logits and states."""
    from regla_torch import ReGLAConfig, ReGLAForCausalLM
    from regla_torch.generate import persistent_weights
    from regla_torch.ops.triton.persistent_step import PersistentStep
    torch.manual_seed(0)
    args = spec.ModelArgs(attn_type=attn_type, vocab_size=300, hidden_size=1024, num_hidden_layers=2, num_heads=4,
                          expand_k=0.5, intermediate_size=700)
    model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).eval().double()
    for n, p in model.named_parameters():
        p.data.normal_(0, 0.05 if "weight" in n and p.dim() == 2 else 0.3)
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.tensor([[3, 17, 99, 5]]), cache=cache, use_cache=True)
        step = PersistentStep(**persistent_weights(model), programs=72)
        with pytest.raises(ValueError, match="warps >= 4 for key heads of 128"):  # a key channel a thread in B
            PersistentStep(**persistent_weights(model), programs=72, warps=2)
        states = [tuple(None if x is None else x.clone() for x in st) for st in cache.states]
        got = _emulate(step, model.config.args, 11, states)
        want = model(torch.tensor([[11]]), cache=cache, use_cache=True).logits[0, -1]
    assert float((got - want).norm() / want.norm()) < 1e-5
    for (s, m, *_), (s_ref, m_ref, *_) in zip(states, cache.states):
        assert float((s.double() - s_ref.double()).norm() / s_ref.double().norm()) < 1e-5
        if m_ref is not None:
            torch.testing.assert_close(m, m_ref)


@pytest.fixture(scope="module")
def hopper():
    from regla_torch.ops.triton.persistent_step import available
    if not (torch.cuda.is_available() and available("cuda")):
        pytest.skip("the persistent step is a Gluon kernel for Hopper (sm_90): run on the device machine")


def _models(attn_type, strong):
    """The same random weights as a bf16 CUDA model and a float64 CPU one."""
    from regla_torch import ReGLAConfig, ReGLAForCausalLM
    torch.manual_seed(0)
    args = spec.ModelArgs(attn_type=attn_type, vocab_size=1000, hidden_size=1024, num_hidden_layers=2, num_heads=4,
                          expand_k=0.5)
    model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).eval()
    for n, p in model.named_parameters():
        p.data.normal_(0, 0.05 if "weight" in n and p.dim() == 2 else 0.3)
    if strong:  # a third of each head's key channels with log gates near -1e4, the rest weak
        for b in model.model.layers:
            bias = b.attn.gk_proj[1].bias.data
            bias[::3] = -1e4 * args.gate_logit_normalizer
            bias[1::3] = 8.0
    gpu = model.to("cuda", torch.bfloat16)
    ref = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).eval().double()
    ref.load_state_dict({k: v.double().cpu() for k, v in gpu.state_dict().items()})
    return gpu, ref


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("attn_type", ["regla", "gla"])
def test_persistent_step_equals_float64_model(hopper, attn_type, strong):
    from regla_torch.generate import GraphStep, persistent_step
    gpu, ref = _models(attn_type, strong)
    prompt = torch.tensor([[3, 17, 99, 5, 200, 42, 7]])
    cache, ref_cache = gpu.make_cache(), ref.make_cache()
    with torch.no_grad():
        ref(prompt, cache=ref_cache, use_cache=True)
    cache.states = [tuple(None if x is None else x.float().cuda().contiguous() for x in st) for st in ref_cache.states]
    cache.seen_tokens = ref_cache.seen_tokens
    assert persistent_step(gpu) is not None
    step = GraphStep(gpu, cache, 1)
    assert step.persistent is not None
    for tok in (11, 400, 3, 999):
        logits = step(torch.tensor([[tok]], device="cuda")).clone()
        with torch.no_grad():
            want = ref(torch.tensor([[tok]]), cache=ref_cache, use_cache=True).logits[:, -1]
        err = float((logits.double().cpu() - want).norm() / want.norm())
        assert err < 1e-4, (tok, err)
        for (s, m, *_), (s_ref, m_ref, *_) in zip(cache.states, ref_cache.states):
            assert float((s.double().cpu() - s_ref).norm() / s_ref.norm()) < 1e-4
            if m_ref is not None:
                torch.testing.assert_close(m.double().cpu(), m_ref.double(), rtol=1e-5, atol=1e-5)


def test_persistent_step_streams_the_same_tokens(hopper):
    """The library's generation loop (what chat runs) through the persistent step: the tokens
    of greedy steps of the captured step called one by one from the same prefill, the same
    states after, and the step is the persistent one (REGLA_PERSISTENT=0 turns it off)."""
    import os

    from regla_torch.generate import GraphStep, persistent_step, stream_tokens
    gpu, _ = _models("regla", False)
    prompt = [3, 17, 99, 5, 200, 42, 7]
    cache = gpu.make_cache()
    got = list(stream_tokens(gpu, prompt, cache, 24, {"temp": 0.0}))
    ref_cache = gpu.make_cache()
    with torch.no_grad():
        logits = gpu(torch.tensor([prompt], device="cuda"), cache=ref_cache, use_cache=True).logits[:, -1]
    step = GraphStep(gpu, ref_cache, 1)
    assert step.persistent is gpu._persistent_step
    want = [int(logits.argmax())]
    for _ in range(23):
        want.append(int(step(torch.tensor([[want[-1]]], device="cuda")).argmax()))
    assert got == want and len(set(got)) > 3
    # the loop ran the token that reached max_tokens through no step; the manual loop did not either
    for (s, m, *_), (s_ref, m_ref, *_) in zip(cache.states, ref_cache.states):
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m, m_ref)
    os.environ["REGLA_PERSISTENT"] = "0"
    try:
        assert persistent_step(gpu) is None
    finally:
        del os.environ["REGLA_PERSISTENT"]
    # built once a model, again after its weights change in place (its packed copy is of them)
    built = persistent_step(gpu)
    assert persistent_step(gpu) is built
    with torch.no_grad():
        gpu.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    rebuilt = persistent_step(gpu)
    assert rebuilt is not built and not torch.equal(rebuilt.w, built.w)



def _compile_for_hopper(attn_type):
    """The kernel compiled for sm_90 (PTX and a cubin, by Triton's own ptxas; no GPU needed) with
    the arguments ``PersistentStep`` launches it with for a small model of this attn_type."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from regla_torch import ReGLAConfig, ReGLAForCausalLM
    from regla_torch.generate import persistent_weights
    from regla_torch.ops.triton.persistent_step import PersistentStep, _kernel
    torch.manual_seed(0)
    args = spec.ModelArgs(attn_type=attn_type, vocab_size=300, hidden_size=1024, num_hidden_layers=2, num_heads=4,
                          expand_k=0.5)
    model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).eval().to(torch.bfloat16)
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.tensor([[3, 17]]), cache=cache, use_cache=True)
    step = PersistentStep(**persistent_weights(model), programs=72)
    states = [tuple(None if x is None else x.float().contiguous() for x in st) for st in cache.states]
    pos, kw = step.launch_args(torch.tensor([[5]]), states)
    kernel, warps = _kernel(), kw.pop("num_warps")
    kinds = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}
    sig = {n: kinds[a.dtype] if torch.is_tensor(a) else "i32" if isinstance(a, int) else "fp32"
           for n, a in zip(kernel.arg_names, pos)}
    sig.update({n: "constexpr" for n in kw})
    # as Triton's launcher specializes them: 16-byte aligned pointers and multiples of 16
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(pos)
               if (a.data_ptr() if torch.is_tensor(a) else a if isinstance(a, int) else 1) % 16 == 0}
    out = triton.compile(GluonASTSource(kernel, sig, kw, aligned), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps))
    assert ".target sm_90" in out.asm["ptx"] and out.asm["cubin"]
    print(f"compiled: {attn_type}, {len(out.asm['cubin'])} bytes of cubin")


@pytest.mark.parametrize("attn_type", ["regla", "gla"])
def test_kernel_compiles_for_hopper(attn_type):
    """On any machine with Triton: the kernel compiles for Hopper. CI cannot run it (Gluon has no
    interpreter), so this is where a Gluon API or a layout the compiler refuses shows up before
    the GPU. In a child process: here TRITON_INTERPRET=1 (conftest) makes the kernel's Triton
    helpers interpreter functions, which Gluon cannot compile."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton.experimental.gluon", reason="Gluon (Triton >= 3.4) compiles the kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, attn_type], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and f"compiled: {attn_type}" in run.stdout, run.stderr[-3000:]


if __name__ == "__main__":  # test_kernel_compiles_for_hopper's child
    import sys
    _compile_for_hopper(sys.argv[1])
