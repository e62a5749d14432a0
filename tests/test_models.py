"""Whole models: the same random weights through the spec, the torch model and the MLX model."""

import json
import shutil

import numpy as np
import pytest
import torch

from regla import spec
from regla.checkpoint import CheckpointError
from regla_torch import ReGLAConfig, ReGLAForCausalLM, load
from conftest import rel_rms

CONFIGS = {
    "regla": dict(attn_type="regla"),
    "gla": dict(attn_type="gla", tie_word_embeddings=True),
    "gsa": dict(attn_type="gsa", num_slots=8),
    "regla-hybrid": dict(attn_type="regla", softmax_layers=[1], num_kv_heads=1),
    "regla-ablation": dict(attn_type="regla", feature_map="elu", use_refining_gate=False,
                           attn_norm="layernorm", gate_low_rank_dim=0, gate_logit_normalizer=16),
}


def tiny(name):
    return spec.ModelArgs(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, **CONFIGS[name])


def torch_model(cfg, w):
    m = ReGLAForCausalLM(ReGLAConfig(**cfg.to_dict())).eval()
    sd = {k: torch.from_numpy(v) for k, v in w.items()}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embeddings.weight"]
    m.load_state_dict(sd, strict=True)
    return m


def mlx_model(cfg, w):
    mx = pytest.importorskip("mlx.core", reason="MLX is not installed")
    from regla_mlx.model import Model

    m = Model(cfg)
    m.load_weights([(k, mx.array(v)) for k, v in w.items()], strict=True)
    return m


@pytest.fixture(params=list(CONFIGS))
def case(request):
    cfg = tiny(request.param)
    w = spec.init_weights(cfg, seed=1, std=0.3)
    ids = np.random.default_rng(2).integers(0, 64, (2, 80))  # 80 > 64: chunked path in both backends
    ref, _ = spec.model_forward(w, cfg, ids)
    return cfg, w, ids, ref


def test_torch_logits_match_spec(case):
    cfg, w, ids, ref = case
    with torch.no_grad():
        out = torch_model(cfg, w)(torch.from_numpy(ids), use_cache=False).logits
    assert rel_rms(out, ref) <= 1e-5


def test_mlx_logits_match_spec(case):
    cfg, w, ids, ref = case
    import mlx.core as mx

    out = np.array(mlx_model(cfg, w)(mx.array(ids)))
    assert rel_rms(out, ref) <= 1e-5


def test_torch_prefill_then_decode_equals_full_forward(case):
    cfg, w, ids, ref = case
    m = torch_model(cfg, w)
    cache = m.make_cache()
    with torch.no_grad():
        outs = [m(torch.from_numpy(ids[:, :70]), cache=cache, use_cache=True).logits]
        outs += [m(torch.from_numpy(ids[:, t:t + 1]), cache=cache, use_cache=True).logits for t in range(70, 80)]
    assert rel_rms(torch.cat(outs, 1), ref) <= 1e-5


@pytest.mark.parametrize("name", ["regla", "gsa"])
def test_compiled_decode_step_equals_full_forward(name):
    """GraphStep's torch.compile'd step (here on the CPU, without the CUDA graph) computes the
    forward pass and leaves the states where the eager step does."""
    from regla_torch.generate import _compiled_decode

    cfg = tiny(name)
    w = spec.init_weights(cfg, seed=1, std=0.3)
    ids = np.random.default_rng(2).integers(0, 64, (2, 80))
    ref, _ = spec.model_forward(w, cfg, ids)
    m = torch_model(cfg, w)
    cache = m.make_cache()
    step = _compiled_decode()
    with torch.no_grad():
        outs = [m(torch.from_numpy(ids[:, :75]), cache=cache, use_cache=True).logits]
        for t in range(75, 80):
            logits, cache.states = step(m, torch.from_numpy(ids[:, t:t + 1]), cache.states)
            outs.append(logits[:, None])
    assert rel_rms(torch.cat(outs, 1), ref) <= 1e-5


def test_mlx_prefill_then_decode_equals_full_forward(case):
    cfg, w, ids, ref = case
    import mlx.core as mx

    m = mlx_model(cfg, w)
    cache = m.make_cache()
    outs = [m(mx.array(ids[:, :70]), cache)] + [m(mx.array(ids[:, t:t + 1]), cache) for t in range(70, 80)]
    assert rel_rms(np.array(mx.concatenate(outs, 1)), ref) <= 1e-5


@pytest.mark.parametrize("name", ["regla", "gla"])
def test_training_loss_by_blocks_equals_the_loss_of_whole_logits(name, monkeypatch):
    """A training forward with labels forms its logits a block of rows at a time (and returns
    none): same loss and gradients as the cross-entropy of the whole logits, ignored labels
    and a block boundary inside a row included."""
    import regla_torch.model as M
    cfg = tiny(name)
    torch.manual_seed(0)
    m = ReGLAForCausalLM(ReGLAConfig(**cfg.to_dict())).train()
    ids = torch.randint(0, cfg.vocab_size, (3, 21))
    labels = ids.clone()
    labels[0, :5] = -100
    by_blocks = M.lm_loss_by_blocks
    monkeypatch.setattr(M, "lm_loss_by_blocks", lambda *a: by_blocks(*a, rows=8))  # 60 rows: 8 blocks
    out = m(input_ids=ids, labels=labels, use_cache=False)
    assert out.logits is None
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    logits = m(input_ids=ids, use_cache=False).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    ref.backward()
    assert abs(out.loss.item() - ref.item()) <= 1e-6 * ref.item()
    for n, p in m.named_parameters():
        assert rel_rms(got[n].numpy(), p.grad.numpy()) <= 1e-5, n
    with torch.no_grad():  # evaluation keeps the logits
        assert m(input_ids=ids, labels=labels, use_cache=False).logits.shape == (3, 21, cfg.vocab_size)


@pytest.mark.parametrize("name", ["regla", "gsa"])
def test_training_recomputes_norms_and_gating_with_the_same_gradients(name, monkeypatch):
    """Under autograd the pre-norms before each projection, the attention's output norm and gate
    and the MLP's silu(gate) * up are recomputed in the backward (torch.utils.checkpoint)
    instead of kept: the loss equals that of the plain path (no autograd), the gradients those
    of running the same functions without recomputation."""
    import torch.utils.checkpoint as C
    cfg = tiny(name)
    torch.manual_seed(0)
    m = ReGLAForCausalLM(ReGLAConfig(**cfg.to_dict())).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    loss = m(input_ids=ids, labels=ids, use_cache=False).loss
    with torch.no_grad():  # no recomputation there: the projections' plain path
        plain = m(input_ids=ids, labels=ids, use_cache=False).loss
    assert abs(loss.item() - plain.item()) <= 1e-6 * plain.item()
    loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    wrapped = []
    monkeypatch.setattr(C, "checkpoint", lambda fn, *a, use_reentrant: (wrapped.append(fn.__name__), fn(*a))[1])
    m.zero_grad()
    m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    # per block: the attention's and the MLP's input projections and output projections
    assert wrapped.count("norm_linear") == 2 * cfg.num_hidden_layers
    assert wrapped.count("_prepared_linear") == 2 * cfg.num_hidden_layers
    for n, p in m.named_parameters():
        assert rel_rms(got[n].numpy(), p.grad.numpy()) <= 1e-6, n


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs a C++ compiler (g++)")
# (each case compiles cold in CI, ~40-60 s: three cover both row kinds and the three layer types)
@pytest.mark.parametrize("name,packed", [("regla", False), ("gsa", True), ("regla-hybrid", True)])
def test_training_with_compiled_blocks_gives_the_same_gradients(name, packed, monkeypatch):
    """On CUDA under autograd every block runs as one torch.compile'd graph each way
    (``model._stateless_block``). Forced on here (Inductor's CPU code): the same loss and
    gradients as eager, for plain and packed (cu_seqlens) rows, and no graph break inside a
    linear block."""
    import regla_torch.ops.linear as L
    cfg = tiny(name)
    torch.manual_seed(0)
    m = ReGLAForCausalLM(ReGLAConfig(**cfg.to_dict())).train()
    ids = torch.randint(0, cfg.vocab_size, (1 if packed else 2, 70))
    cu = torch.tensor([0, 9, 10, 70]) if packed else None
    loss = m(input_ids=ids, labels=ids, use_cache=False, cu_seqlens=cu).loss
    loss.backward()
    eager = {n: p.grad.clone() for n, p in m.named_parameters()}
    monkeypatch.setattr(L, "_compiles", lambda x: torch.is_grad_enabled())
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    m.zero_grad()
    got = m(input_ids=ids, labels=ids, use_cache=False, cu_seqlens=cu).loss
    got.backward()
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters)
    if name != "regla-hybrid":  # (a softmax layer's packed mask reads the offsets: a break there)
        assert not counters["graph_break"], dict(counters["graph_break"])
    assert abs(got.item() - loss.item()) <= 1e-6 * loss.item()
    for n, p in m.named_parameters():  # (fused fp32 sums reorder: GSA's smallest gradients move ~2e-5)
        assert rel_rms(eager[n].numpy(), p.grad.numpy()) <= 1e-4, n


def test_linear_state_has_the_same_size_at_every_length():
    cfg = tiny("regla")
    m = torch_model(cfg, spec.init_weights(cfg))
    cache = m.make_cache()
    sizes = []
    with torch.no_grad():
        m(torch.zeros(1, 10, dtype=torch.long), cache=cache, use_cache=True)
        sizes.append([tuple(t.shape) for st in cache.states for t in st if t is not None])
        for _ in range(100):
            m(torch.zeros(1, 1, dtype=torch.long), cache=cache, use_cache=True)
        sizes.append([tuple(t.shape) for st in cache.states for t in st if t is not None])
    assert sizes[0] == sizes[1] and cache.seen_tokens == 110


def test_hf_generate_uses_the_recurrent_cache_one_token_at_a_time():
    cfg = tiny("regla")
    m = torch_model(cfg, spec.init_weights(cfg, std=0.3))
    seen = []
    hook = m.model.embeddings.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    prompt = torch.tensor([[3, 4, 5, 6, 7]])
    out = m.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    hook.remove()
    assert seen == [5, 1, 1, 1, 1, 1]  # prefill, then one token per step: O(1) per token
    # the same tokens as greedy decoding by full forwards (no cache)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = m(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert out.tolist() == ids.tolist()


def test_save_pretrained_round_trip_and_auto_class(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny("regla-hybrid")
    m = torch_model(cfg, spec.init_weights(cfg, std=0.3))
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "regla"
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        a = m(ids, use_cache=False).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path)(ids, use_cache=False).logits
        c = load(tmp_path)(ids, use_cache=False).logits
    assert torch.equal(a, b) and torch.equal(a, c)


def test_tied_gla_round_trip(tmp_path):
    cfg = tiny("gla")
    m = torch_model(cfg, spec.init_weights(cfg, std=0.3))
    m.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(m(ids, use_cache=False).logits, load(tmp_path)(ids, use_cache=False).logits)


def test_checkpoint_with_wrong_shapes_is_refused_clearly(tmp_path):
    cfg = tiny("regla")
    torch_model(cfg, spec.init_weights(cfg)).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(spec.ConfigError, match="do not match the config"):
        load(tmp_path)


def test_missing_folder_and_config_are_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)


def test_hf_generate_continues_from_a_filled_cache():
    cfg = tiny("regla-hybrid")
    m = torch_model(cfg, spec.init_weights(cfg, std=0.3))
    first = torch.tensor([[3, 4, 5, 6]])
    cache = m.make_cache()
    out1 = m.generate(first, cache=cache, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    more = torch.cat([out1, torch.tensor([[9, 10]])], 1)
    out2 = m.generate(more, cache=cache, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    fresh = m.generate(more, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out2.tolist() == fresh.tolist()


@pytest.mark.parametrize("name", ["regla", "gla", "regla-hybrid", "gsa"])
def test_packed_training_forward_equals_sequences_one_by_one(name):
    cfg = tiny(name)
    m = torch_model(cfg, spec.init_weights(cfg, seed=3, std=0.3)).train()
    lengths = [7, 1, 70, 30]
    ids = torch.randint(0, 64, (1, sum(lengths)))
    cu = torch.tensor([0] + lengths).cumsum(0)
    packed = m(ids, cu_seqlens=cu, use_cache=False).logits
    alone = torch.cat([m(ids[:, a:b], use_cache=False).logits for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert rel_rms(packed.detach(), alone.detach().numpy()) <= 1e-5


def test_packed_prefill_leaves_each_sequence_its_own_state():
    cfg = tiny("regla")
    m = torch_model(cfg, spec.init_weights(cfg, seed=4, std=0.3))
    ids = torch.randint(0, 64, (1, 80))
    cu = torch.tensor([0, 30, 80])
    cache = m.make_cache()
    with torch.no_grad():
        m(ids, cache=cache, use_cache=True, cu_seqlens=cu)
        for n, (a, b) in enumerate([(0, 30), (30, 80)]):
            alone = m.make_cache()
            m(ids[:, a:b], cache=alone, use_cache=True)
            for packed, single in zip(cache.states, alone.states):
                for x, y in zip(packed, single):
                    assert rel_rms(x[n:n + 1], y.numpy()) <= 1e-5


def test_cli_spec_check_reports_both_backends_agreeing():
    from typer.testing import CliRunner

    from regla.cli import app

    r = CliRunner().invoke(app, ["spec-check", "--attn-type", "regla"])
    assert r.exit_code == 0, r.output
    assert "regla  torch" in r.output and "regla  mlx" in r.output and "MISMATCH" not in r.output


def test_compiled_blocks_of_two_layer_types_in_one_process(monkeypatch):
    """Training compiles each block (``model._stateless_block``). A GLA model's blocks compiled,
    then a GSA model's, in one process (bench_train.py measures them so): the GSA block must
    trace (one compiled function shared by the types failed: dynamo had marked the float that
    sets the head dims dynamic) and give the uncompiled loss and gradients. On CPU, the
    plain-torch ops, and the aot_eager backend: the fault is dynamo's tracing, and Inductor's
    C++ code would take a minute to build."""
    import functools

    import regla_torch.model
    import regla_torch.ops.linear

    monkeypatch.setenv("REGLA_TRITON", "0")
    monkeypatch.setattr(regla_torch.model, "_compiled_blocks", {}, raising=False)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    for attn_type in ("gla", "gsa"):
        args = spec.ModelArgs(attn_type=attn_type, vocab_size=64, hidden_size=64, num_hidden_layers=2, num_heads=2)
        torch.manual_seed(0)
        model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).train()
        got = {}
        for compiled in (False, True):
            monkeypatch.setattr(regla_torch.ops.linear, "_compiles", lambda x, c=compiled: c and torch.is_grad_enabled())
            model.zero_grad()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            got[compiled] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
        for a, b in zip(got[True], got[False]):
            # aot_eager runs the traced graph's decomposed ops: fp32 sums in another order
            assert rel_rms(a.numpy(), b.numpy()) <= 1e-4, attn_type
