"""Padded batches give every row what it gets alone.

MLX: mlx-lm's own continuous batching (``BatchGenerator``, what ``mlx_lm.server`` runs),
prompts of unequal length right-padded in prefill chunks, sequences joining mid-generation
(cache ``merge``/``extend``), leaving (``filter``) and handing back their caches
(``extract``). PyTorch: transformers' ``generate`` on a left-padded batch with its
``attention_mask``. Greedy tokens are compared with each prompt run alone.
"""

import numpy as np
import pytest

from regla import spec

KINDS = {
    "regla": dict(attn_type="regla"),
    "gla": dict(attn_type="gla"),
    "gsa": dict(attn_type="gsa"),
    "hybrid": dict(attn_type="regla", softmax_layers=[1]),
    "gla_conv": dict(attn_type="gla", use_short_conv=True, feature_map="elu"),
    "gsa_conv": dict(attn_type="gsa", use_short_conv=True),
}
VOCAB = 97
PROMPTS = [[int(t) for t in np.random.default_rng(0).integers(1, VOCAB, n)] for n in (5, 11, 1, 70, 3)]
NEW = 6


def weights(kind):
    args = spec.ModelArgs(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=2, num_slots=8,
                          **KINDS[kind])
    return args, spec.init_weights(args, 1, std=0.3)


@pytest.fixture(params=list(KINDS))
def mlx_model(request):
    mx = pytest.importorskip("mlx.core")
    from regla_mlx.model import Model

    args, w = weights(request.param)
    model = Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in w.items()], strict=True)
    return model


def alone_mlx(model, prompt, n=NEW):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def test_mlx_batch_generator_rows_equal_alone(mlx_model):
    from mlx_lm.generate import BatchGenerator

    want = [alone_mlx(mlx_model, p, 12) for p in PROMPTS]
    # small prefill chunks: rows of unequal length are right-padded across several chunks
    gen = BatchGenerator(mlx_model, max_tokens=12, prefill_step_size=8, prefill_batch_size=3)
    first = gen.insert(PROMPTS[:3])
    got = {uid: [] for uid in first}
    late, removed, extracted, step = [], None, {}, 0
    while True:
        responses = gen.next_generated()
        if not responses and not late:
            break
        for r in responses:
            got.setdefault(r.uid, []).append(r.token)
        step += 1
        if step == 3:  # two sequences join while three are generating (merge, extend)
            late = gen.insert(PROMPTS[3:])
            got.update({uid: [] for uid in late})
        if step == 5:  # one leaves, handing back its cache (filter, extract)
            removed = first[1]
            extracted = gen.remove([removed], return_prompt_caches=True)
        if not responses and step > 40:
            break
    gen.close()
    order = first + late
    for uid, prompt_tokens in zip(order, want):
        n = len(got[uid])
        assert n > 0
        assert got[uid] == prompt_tokens[:n], (uid, got[uid], prompt_tokens)
        if uid != removed:
            assert n == 12
    # the handed-back cache holds what the sequence's tokens give alone
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache

    cache, tokens = extracted[removed]
    assert tokens[:len(PROMPTS[1])] == PROMPTS[1]
    fresh = mlx_model.make_cache()
    mlx_model(mx.array([tokens]), cache=fresh)
    for c, f in zip(cache, fresh):
        if isinstance(c, ArraysCache):
            for a, b in zip(c.cache, f.cache):
                np.testing.assert_allclose(np.array(a), np.array(b), rtol=2e-4, atol=2e-5)


def test_mlx_batch_generate_unequal_prompts(mlx_model):
    from mlx_lm.generate import batch_generate

    class Tok:  # what batch_generate reads of a tokenizer; no id here is an EOS
        eos_token_ids = [VOCAB + 1]

        def decode(self, ids):
            return " ".join(map(str, ids))

    r = batch_generate(mlx_model, Tok(), PROMPTS, max_tokens=NEW, return_token_ids=True)
    assert [list(t) for t in r.token_ids] == [alone_mlx(mlx_model, p) for p in PROMPTS]


@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_generate_left_padded_batch(kind):
    torch = pytest.importorskip("torch")
    from regla_torch.loading import model_from_weights

    args, w = weights(kind)
    model = model_from_weights(args, {k: torch.from_numpy(v) for k, v in w.items()}).eval()
    gen = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    alone = [model.generate(torch.tensor([p]), **gen)[0, len(p):].tolist() for p in PROMPTS]
    L = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in PROMPTS])
    batched = model.generate(ids, attention_mask=mask, **gen)[:, L:].tolist()
    assert batched == alone


def test_mlx_batching_through_emulated_metal_kernels():
    """The same exactness with the Metal kernels doing the layers' recurrence (head dims that
    take them: K 64, V 128), run here by the CPU emulator of tests/metal_emu."""
    import shutil
    import sys

    mx = pytest.importorskip("mlx.core")
    if not sys.platform.startswith("linux") or shutil.which("g++") is None:
        pytest.skip("the Metal emulator runs on Linux with g++ (on a Mac the real kernels run: pytest -m metal)")
    import metal_emu
    from mlx_lm.generate import BatchGenerator

    from regla_mlx.model import Model

    args = spec.ModelArgs(attn_type="regla", vocab_size=VOCAB, hidden_size=128, num_hidden_layers=1, num_heads=1)
    model = Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in spec.init_weights(args, 2, std=0.3).items()], strict=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]  # 5, 11 and 70 tokens: the 70 take the chunk kernel
    with metal_emu.emulated_metal():
        start = metal_emu.EmulatedMetalKernel.calls
        want = [alone_mlx(model, p, 4) for p in prompts]
        gen = BatchGenerator(model, max_tokens=4, prefill_step_size=80)
        uids = gen.insert(prompts)
        got = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                got[r.uid].append(r.token)
        gen.close()
        assert metal_emu.EmulatedMetalKernel.calls > start, "no Metal kernel ran"
    assert [got[u] for u in uids] == want
