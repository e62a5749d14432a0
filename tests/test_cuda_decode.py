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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_equals_eager(attn_type, dtype):
    model = tiny(attn_type, dtype)
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
