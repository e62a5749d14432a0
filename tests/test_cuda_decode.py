"""Decode on CUDA: the in-place Triton step and the CUDA-graph step against the eager loop."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton "
                                "decode kernel need an NVIDIA GPU (run on the device machine)")

from regla import spec  # noqa: E402
from regla_torch import ReGLAConfig, ReGLAForCausalLM  # noqa: E402
from regla_torch.generate import GraphStep, stream_tokens  # noqa: E402


def tiny(attn_type, dtype):
    torch.manual_seed(0)
    args = spec.ModelArgs(attn_type=attn_type, vocab_size=256, hidden_size=128, num_hidden_layers=2, num_heads=2,
                          **({"num_slots": 16} if attn_type == "gsa" else {}))
    model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).eval()
    for p in model.parameters():  # larger weights: varied, input-dependent tokens
        p.data.normal_(0, 0.3)
    return model.to("cuda", dtype)


def eager(model, prompt, n):
    cache, x, out = model.make_cache(), torch.tensor([prompt], device="cuda"), []
    with torch.no_grad():
        for i in range(n):
            tok = int(model(x, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1))
            out.append(tok)
            if i + 1 < n:
                x = torch.tensor([[tok]], device="cuda")
    return out, cache


@pytest.mark.parametrize("attn_type", ["regla", "gla", "gsa"])
def test_fused_decode_projections_equal_full_forward_fp32(attn_type):
    """Decode steps (a few rows: the Triton GEMVs with the norms, gating and residual adds
    folded in) against one full forward over the whole sequence (cuBLAS and plain torch)."""
    model = tiny(attn_type, torch.float32)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache()
        steps = [model(ids[:, :8], cache=cache, use_cache=True).logits[:, -1]]
        steps += [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1] for t in range(8, 20)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_type", ["regla", "gla", "gsa"])
def test_compiled_graph_decode_equals_eager_fp32(attn_type):
    model = tiny(attn_type, torch.float32)
    prompt = [3, 17, 99, 5, 200, 42, 7]
    ref, ref_cache = eager(model, prompt, 40)
    cache = model.make_cache()
    got = list(stream_tokens(model, prompt, cache, 40, {"temp": 0.0}))
    assert GraphStep.supported(model, cache)
    assert got == ref and len(set(got)) > 3
    assert cache.seen_tokens == ref_cache.seen_tokens == len(prompt) + 39
    for a, b in zip(cache.states, ref_cache.states):
        for x, y in zip(a, b):
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_graph_loop_runs_one_step_ahead():
    """On the graph path the loop queues the step that reads a token before the host sees it:
    stopped by an eos, the cache has read the eos (and equals the eager cache that read it);
    stopped by the caller it has too; stopped by max_tokens it has not; sampling (temp > 0)
    runs the same loop."""
    model = tiny("regla", torch.float32)
    prompt = [3, 17, 99, 5, 200, 42, 7]
    ref, _ = eager(model, prompt, 40)
    stop = ref[10]
    n = ref.index(stop) + 1
    _, read_stop = eager(model, prompt, n + 1)  # has read the first n tokens
    cache = model.make_cache()
    got = list(stream_tokens(model, prompt, cache, 40, {"temp": 0.0}, eos={stop}))
    assert got == ref[:n] and cache.seen_tokens == len(prompt) + n
    for a, b in zip(cache.states, read_stop.states):
        for x, y in zip(a, b):
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    cache = model.make_cache()
    loop = stream_tokens(model, prompt, cache, 40, {"temp": 0.0})
    first = [next(loop) for _ in range(5)]
    loop.close()  # the caller stops reading: the fifth token's step is already queued
    assert first == ref[:5] and cache.seen_tokens == len(prompt) + 5
    cache = model.make_cache()
    torch.manual_seed(5)
    got = list(stream_tokens(model, prompt, cache, 30, {"temp": 1.0, "top_p": 0.9, "repetition_penalty": 1.2}))
    assert len(got) == 30 and all(0 <= t < 256 for t in got) and len(set(got)) > 3
    assert cache.seen_tokens == len(prompt) + 29


def teacher_forced(model, prompt, tokens, compile):
    """Per-step logits [steps, vocab] and the final states, feeding ``tokens`` one by one
    through eager steps (compile None) or a GraphStep."""
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.tensor([prompt], device="cuda"), cache=cache, use_cache=True)
        step = None if compile is None else GraphStep(model, cache, 1, compile=compile)
        out = []
        for t in tokens:
            x = torch.tensor([[t]], device="cuda")
            out.append(step(x).float().clone() if step is not None else
                       model(x, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float())
    return torch.cat(out), cache.states


@pytest.mark.parametrize("attn_type", ["regla", "gla", "gsa"])
def test_graph_decode_bf16(attn_type):
    """bf16: the captured eager step is the eager step bit for bit; the compiled one fuses
    elementwise work without rounding to bf16 in between, so it matches to bf16 precision."""
    model = tiny(attn_type, torch.bfloat16)
    prompt, tokens = [3, 17, 99, 5, 200, 42, 7], torch.randint(0, 256, (30,)).tolist()
    ref, ref_states = teacher_forced(model, prompt, tokens, None)
    graph, graph_states = teacher_forced(model, prompt, tokens, False)
    assert torch.equal(graph, ref)
    comp, comp_states = teacher_forced(model, prompt, tokens, True)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    assert rel(comp, ref) < 2e-2
    for a, b in zip(comp_states, ref_states):
        for x, y in zip(a, b):
            if x is not None:
                assert rel(x, y) < 2e-2


def test_graph_step_batch_matches_rows():
    model = tiny("regla", torch.float32)
    ids = torch.randint(0, 256, (4, 9), device="cuda")
    cache = model.make_cache()
    with torch.no_grad():
        nxt = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    step = GraphStep(model, cache, 4)
    rows = []
    for _ in range(12):
        nxt = step(nxt).argmax(-1, keepdim=True)
        rows.append(nxt)
    got = torch.cat(rows, 1)
    for b in range(4):
        ref, _ = eager(model, ids[b].tolist(), 13)
        assert got[b].tolist() == ref[1:]
