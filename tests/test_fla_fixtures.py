"""fla's own checkpoints and fla's own logits (tests/fixtures/fla, made on an H200 by fla 0.6.0
with tests/fixtures/make_fla.py): regla_torch.load, `regla convert` to MLX and the spec must
reproduce them, for every GLA/GSA config variant there; decoding through the cache must give
what the full forward gives.

T=40 is what fla's layers run through their recurrent kernels, T=100 through their chunk
kernels (fp32 dots in full precision).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import rel_rms
from regla import checkpoint, spec

FIXTURES = Path(__file__).parent / "fixtures" / "fla"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
NAMES = sorted(MANIFEST["models"])
LENGTHS = (40, 100)
TOL = 1e-4  # fp32; observed ~1e-6
PREFILL = 60  # decode check: 60 tokens through the recurrent path, then 40 single steps


def fla_outputs(name):
    from safetensors.numpy import load_file

    return load_file(str(FIXTURES / name / "fla_logits.safetensors"))


def test_fixtures_cover_the_grid():
    """The fixtures were made by fla itself (on a GPU) and cover both layer types and the fields
    that change fla's math."""
    assert MANIFEST["fla"] == "0.6.0" and MANIFEST["device"] != "cpu"
    fields = {k for m in MANIFEST["models"].values() for k in m["fields"]}
    assert {"elementwise_affine", "use_output_gate", "fuse_norm", "use_short_conv", "feature_map", "clamp_min",
            "num_kv_heads", "tie_word_embeddings", "hidden_ratio", "norm_eps", "gate_logit_normalizer",
            "num_slots", "expand_k", "expand_v"} <= fields
    assert {m["kind"] for m in MANIFEST["models"].values()} == {"gla", "gsa"} and len(NAMES) >= 10


@pytest.mark.parametrize("name", NAMES)
def test_spec_matches_fla(name):
    folder = FIXTURES / name
    args = checkpoint.read_args(folder)
    weights = checkpoint.sanitize(checkpoint.read_weights(folder), args)
    spec.check_weights(weights, args)
    ref = fla_outputs(name)
    for T in LENGTHS:
        out, _ = spec.model_forward(weights, args, ref[f"ids_{T}"])
        assert rel_rms(out, ref[f"logits_{T}"]) <= TOL, (name, T)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_matches_fla_and_decodes(name, device):
    """On CUDA this runs the Triton kernels (fp32 dots in full precision) and the fused decode."""
    torch = pytest.importorskip("torch")
    import regla_torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (the Triton path; run on the device machine)")
    model = regla_torch.load(FIXTURES / name, device=device).float()
    ref = fla_outputs(name)
    for T in LENGTHS:
        ids = torch.from_numpy(ref[f"ids_{T}"]).to(device)
        with torch.no_grad():
            full = model(ids, use_cache=False).logits.double().cpu().numpy()
        assert rel_rms(full, ref[f"logits_{T}"]) <= TOL, (name, T)
    with torch.no_grad():  # T=100: a prefill, then token by token, against the chunked full pass
        cache = model.make_cache()
        steps = [model(ids[:, :PREFILL], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(PREFILL, ids.shape[1])]
    assert rel_rms(torch.cat(steps, 1).double().cpu().numpy(), full) <= 1e-5, name


@pytest.mark.filterwarnings("ignore:.*has no tokenizer files")  # fla's fixtures carry weights only
@pytest.mark.parametrize("name", NAMES)
def test_converted_mlx_matches_fla_and_decodes(name, tmp_path):
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    import regla_mlx
    from regla.convert import convert

    dst = convert(FIXTURES / name, tmp_path / "mlx", log=lambda *_: None)
    model = regla_mlx.load_model(dst)
    ref = fla_outputs(name)
    for T in LENGTHS:
        ids = mx.array(ref[f"ids_{T}"])
        full = np.array(model(ids), dtype=np.float64)
        assert rel_rms(full, ref[f"logits_{T}"]) <= TOL, (name, T)
    cache = model.make_cache()
    steps = [model(ids[:, :PREFILL], cache=cache)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(PREFILL, ids.shape[1])]
    assert rel_rms(np.array(mx.concatenate(steps, 1), dtype=np.float64), full) <= 1e-5, name


@pytest.mark.parametrize("field, value, words", [
    ("attn", {"layers": [1], "num_heads": 2}, "softmax attention layers"),
    ("feature_map", "gelu", "feature_map 'gelu'"),
    ("hidden_act", "powlu", "hidden_act 'powlu'"),
    ("attnres_block_size", 2, "attention residuals"),
])
def test_fla_fields_regla_cannot_honour_are_named(field, value, words):
    cfg = json.loads((FIXTURES / "gla_base" / "config.json").read_text())
    cfg[field] = value
    with pytest.raises(spec.ConfigError, match=words):
        spec.ModelArgs.from_dict(cfg)


def test_fields_fla_ignores_are_ignored():
    """fla's GLA layer hard-codes its gate normalizer and rank (16); GSA does not pass on
    clamp_min. A config that carries them anyway must give fla's numbers, not others."""
    gla = json.loads((FIXTURES / "gla_base" / "config.json").read_text())
    gla.update(gate_logit_normalizer=4, gate_low_rank_dim=8)
    args = spec.ModelArgs.from_dict(gla)
    assert (args.gate_logit_normalizer, args.gate_low_rank_dim) == (16.0, 16)
    gsa = json.loads((FIXTURES / "gsa_base" / "config.json").read_text())
    gsa.update(clamp_min=-0.01)
    assert spec.ModelArgs.from_dict(gsa).clamp_min is None
