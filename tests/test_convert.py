"""HF / fla-hub -> MLX -> HF conversion: formats, numerics, quantization and failure handling."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402

import regla_mlx  # noqa: E402
import regla_torch  # noqa: E402
from conftest import rel_rms  # noqa: E402
from helpers_checkpoints import VOCAB, all_sources, fla_gla_config, write_fla  # noqa: E402
from regla import checkpoint, spec  # noqa: E402
from regla.convert import ConvertError, convert  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(0).integers(3, VOCAB, (1, 80))  # > 64 tokens: the chunked path runs too


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return all_sources(tmp_path_factory.mktemp("src"))


def torch_logits(folder, dtype=None):
    m = regla_torch.load(folder, dtype=dtype)
    with torch.no_grad():
        return m(torch.from_numpy(IDS), use_cache=False).logits.double().numpy()


def mlx_logits(folder_or_model):
    m = regla_mlx.load_model(folder_or_model) if isinstance(folder_or_model, (str, os.PathLike)) else folder_or_model
    return np.array(m(mx.array(IDS)).astype(mx.float32), dtype=np.float64)


def max_rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------- formats and numerics
@pytest.mark.parametrize("name", ["gla", "gla_tied_unfused", "gla_renamed_norm", "gla_bf16_sharded", "gsa",
                                  "regla", "regla_hybrid"])
def test_hf_to_mlx_matches_torch_fp32(sources, tmp_path, name):
    src = sources[name]
    dst = convert(src, tmp_path / "mlx", dtype="f32", log=quiet)
    cfg = json.loads((dst / "config.json").read_text())
    args = checkpoint.read_args(src)
    assert cfg["model_type"] == "regla" and cfg["attn_type"] == args.attn_type
    assert cfg["model_file"] == "regla_model.py" and (dst / "regla_model.py").is_file()
    assert "quantization" not in cfg
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in dst.iterdir()}
    assert list(dst.glob("model*.safetensors")) and not leftovers(tmp_path)
    ref = torch_logits(src, torch.float32)
    assert max_rel(mlx_logits(dst), ref) < 1e-5


def test_legacy_fla_configs_are_read_as_fla_meant_them(sources):
    gla = checkpoint.read_args(sources["gla"])
    assert gla.attn_mode == "chunk" and gla.attn_type == "gla" and gla.norm_name == "g_norm_swish_gate"
    assert gla.gate_logit_normalizer == 16 and gla.expand_k == 0.5
    tied = checkpoint.read_args(sources["gla_tied_unfused"])
    assert tied.tie_word_embeddings and tied.norm_name == "g_norm"
    assert "lm_head.weight" not in checkpoint.read_weights(sources["gla_tied_unfused"])
    gsa = checkpoint.read_args(sources["gsa"])
    assert gsa.expand_k == 1 and gsa.num_slots == 16 and gsa.gate_logit_normalizer == 8 and gsa.scale == 1.0


@pytest.mark.parametrize("name", ["gla", "gla_tied_unfused", "gla_renamed_norm", "gsa", "regla"])
def test_torch_loader_matches_the_float64_spec(sources, name):
    """regla_torch.load reads fla-hub folders without fla: same logits as the spec."""
    folder = sources[name]
    args = checkpoint.read_args(folder)
    w = checkpoint.sanitize(checkpoint.read_weights(folder), args)
    ref, _ = spec.model_forward(w, args, IDS[:, :40])
    m = regla_torch.load(folder)
    with torch.no_grad():
        got = m(torch.from_numpy(IDS[:, :40]), use_cache=False).logits.double().numpy()
    assert max_rel(got, ref) < 1e-5


@pytest.mark.parametrize("name", ["gla", "gsa", "regla_hybrid"])
def test_round_trip_mlx_to_hf_is_exact_and_loads_with_transformers(sources, tmp_path, name):
    from transformers import AutoModelForCausalLM

    src = sources[name]
    mlx_dir = convert(src, tmp_path / "mlx", log=quiet)
    back = convert(mlx_dir, tmp_path / "hf", to="hf", log=quiet)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["model_type"] == "regla" and (back / "model.safetensors").is_file()
    assert (back / "tokenizer.json").is_file()
    m = AutoModelForCausalLM.from_pretrained(back)  # the Auto class, as a transformers user would
    assert type(m).__name__ == "ReGLAForCausalLM"
    args = checkpoint.read_args(src)
    orig = checkpoint.sanitize(checkpoint.read_weights(src), args)
    got = {k: v.numpy() for k, v in m.state_dict().items()}
    for k, v in orig.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    with torch.no_grad():
        out = m(torch.from_numpy(IDS), use_cache=False).logits.double().numpy()
    assert max_rel(out, torch_logits(src)) < 1e-6


def test_bf16_source_and_bf16_output(sources, tmp_path):
    """bf16 storage stays bf16; MLX's bf16 compute is as close to fp32 as PyTorch's bf16 is.

    Measured (2 layers, d 64, init-scale weights): MLX bf16 vs fp32 logits rel-RMS ~7e-3,
    PyTorch bf16 vs fp32 ~6e-3. bf16 keeps 8 bits of mantissa (3.9e-3 per rounding), so a
    whole-model bound of 5e-3 is below what either backend reaches.
    """
    src = sources["gla_bf16_sharded"]
    dst = convert(src, tmp_path / "mlx", log=quiet)  # keeps the source dtype
    model = regla_mlx.load_model(dst)
    assert model.model.embeddings.weight.dtype == mx.bfloat16
    ref = torch_logits(src, torch.float32)  # the same bf16 values, computed in fp32
    mlx_gap = rel_rms(mlx_logits(model), ref)
    torch_gap = rel_rms(torch_logits(src, torch.bfloat16), ref)
    assert mlx_gap < 1.5e-2 and mlx_gap < 2 * torch_gap, (mlx_gap, torch_gap)

    f32_src = sources["regla"]
    dst16 = convert(f32_src, tmp_path / "mlx16", dtype="bf16", log=quiet)
    assert all(v.dtype == mx.bfloat16 for v in mx.load(str(dst16 / "model.safetensors")).values())
    assert rel_rms(mlx_logits(dst16), torch_logits(f32_src)) < 1.5e-2
    back = convert(dst16, tmp_path / "hf16", to="hf", log=quiet)
    assert regla_torch.load(back).model.embeddings.weight.dtype == torch.bfloat16


# Measured on these checkpoints (group size 32, rel-RMS of logits against the fp32 model):
# 8-bit 0.9e-2 .. 1.4e-2, 4-bit 0.15 .. 0.24 (random weights have no outliers to protect and are
# the worst case for 4 bits; the greedy token still agrees at 70-100 % of positions).
Q_TOL = {8: 3e-2, 4: 0.35}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["gla", "gsa", "regla"])
def test_quantized_conversion(sources, tmp_path, name, bits):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    src = sources[name]
    dst = convert(src, tmp_path / "q", q_bits=bits, q_group_size=32, log=quiet)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits and cfg["quantization"]["group_size"] == 32
    stored = {}
    for f in dst.glob("model*.safetensors"):
        stored.update(mx.load(str(f)))
    assert "model.layers.0.attn.q_proj.scales" in stored
    if name != "gsa":  # the rank-16 gate projection does not split into groups of 32: left as is
        assert "model.layers.0.attn.gk_proj.1.scales" not in stored
        assert stored["model.layers.0.attn.gk_proj.1.weight"].dtype == mx.float32
    ours = regla_mlx.load_model(dst)
    q = mlx_logits(ours)
    assert rel_rms(q, torch_logits(src)) < Q_TOL[bits]
    # stock mlx-lm reads the same folder through its model_file entry
    stock, _ = mlx_lm_load_model(dst, trust_remote_code=True)
    np.testing.assert_array_equal(mlx_logits(stock), q)
    # back to HF: dequantized weights reproduce the quantized model's logits
    back = convert(dst, tmp_path / "hf", to="hf", log=quiet)
    assert max_rel(torch_logits(back), q) < 1e-5


def test_loading_an_hf_folder_directly_equals_loading_its_conversion(sources, tmp_path):
    src = sources["gla_renamed_norm"]
    dst = convert(src, tmp_path / "mlx", log=quiet)
    np.testing.assert_array_equal(mlx_logits(src), mlx_logits(dst))


# ----------------------------------------------------------------- failures
def test_dst_exists(sources, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists"):
        convert(sources["gla"], dst, log=quiet)
    assert (dst / "keep.txt").read_text() == "mine"


def _expect_failure(src, tmp_path, match, **kw):
    dst = tmp_path / "out"
    with pytest.raises(ConvertError, match=match) as e:
        convert(src, dst, log=quiet, **kw)
    assert not dst.exists() and not leftovers(tmp_path)
    return str(e.value)


def test_missing_config(sources, tmp_path):
    bad = tmp_path / "src"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((sources["gla"] / "model.safetensors").read_bytes())
    _expect_failure(bad, tmp_path, "no config.json")


def test_missing_weights(tmp_path):
    bad = tmp_path / "src"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(fla_gla_config()))
    _expect_failure(bad, tmp_path, "no model.*safetensors")


def test_corrupt_safetensors(tmp_path):
    src = write_fla(tmp_path / "src", fla_gla_config(), tokenizer=False)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_failure(src, tmp_path, "damaged or truncated")


def test_weights_that_do_not_match_the_config(tmp_path):
    src = write_fla(tmp_path / "src", fla_gla_config(), tokenizer=False)
    (src / "config.json").write_text(json.dumps(fla_gla_config(num_heads=4, expand_k=1.0)))
    msg = _expect_failure(src, tmp_path, "do not match the config")
    assert "q_proj.weight" in msg


def test_unknown_model_type(tmp_path):
    src = write_fla(tmp_path / "src", fla_gla_config(), tokenizer=False)
    (src / "config.json").write_text(json.dumps(fla_gla_config(model_type="llama")))
    _expect_failure(src, tmp_path, "unknown model_type 'llama'")


def test_not_a_folder_nor_a_repo_id(tmp_path):
    _expect_failure(str(tmp_path / "nowhere" / "x" / "y"), tmp_path, "no such folder")


def test_offline_hub_id_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    _expect_failure("fla-hub/gla-340M-15B", tmp_path, "not in the local hub cache")


def test_disk_full_leaves_nothing_behind(sources, tmp_path, monkeypatch):
    import mlx_lm.utils

    def full(path, *a, **k):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mlx_lm.utils, "save_model", full)
    _expect_failure(sources["gla"], tmp_path, "no space left")


def test_quantizing_a_quantized_folder_is_refused(sources, tmp_path):
    q = convert(sources["gla"], tmp_path / "q", q_bits=8, q_group_size=32, log=quiet)
    with pytest.raises(ConvertError, match="already quantized"):
        convert(q, tmp_path / "qq", q_bits=4, log=quiet)
    assert not (tmp_path / "qq").exists()


def test_missing_tokenizer_converts_with_a_warning(tmp_path):
    src = write_fla(tmp_path / "src", fla_gla_config(), tokenizer=False)
    with pytest.warns(UserWarning, match="no tokenizer"):
        dst = convert(src, tmp_path / "out", log=quiet)
    assert (dst / "config.json").is_file() and not (dst / "tokenizer.json").exists()
    with pytest.raises(checkpoint.CheckpointError, match="no tokenizer"):
        regla_mlx.load(dst)


def test_cli_convert_reports_one_line_errors(sources, tmp_path):
    from typer.testing import CliRunner

    from regla.cli import app

    dst = tmp_path / "out"
    dst.mkdir()
    r = CliRunner().invoke(app, ["convert", str(sources["gla"]), str(dst)])
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["convert", str(sources["gla"]), str(tmp_path / "q"), "--q-bits", "8",
                                 "--q-group-size", "32", "--dtype", "f32"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "q"), str(tmp_path / "hf"), "--to", "hf"])
    assert r.exit_code == 0, r.output
    assert regla_torch.load(tmp_path / "hf").config.attn_type == "gla"


# ----------------------------------------------------------------- self-contained MLX folders
BLOCKER = '''
import importlib.abc, sys

class NoRegla(importlib.abc.MetaPathFinder):
    """As in a venv holding only mlx and mlx-lm: regla's packages cannot be imported."""
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("regla", "regla_mlx", "regla_torch"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoRegla())
'''

STOCK_MLX_LM = BLOCKER + '''
from pathlib import Path
import numpy as np
import mlx.core as mx
from mlx_lm.utils import load_model

folder, ids_file, out_file = sys.argv[1:4]
model, _ = load_model(Path(folder), trust_remote_code=True)
logits = model(mx.array(np.load(ids_file)))
np.save(out_file, np.array(logits.astype(mx.float32)))
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("regla", "regla_mlx", "regla_torch"))
assert not ours, ours

from mlx_lm.generate import main
sys.argv = ["mlx_lm.generate", "--model", folder, "--trust-remote-code", "--prompt", "hello there",
            "--max-tokens", "3"]
main()
'''


def run_without_regla(tmp_path, script, *args):
    import subprocess
    import sys

    f = tmp_path / "script.py"
    f.write_text(script)
    # cwd and path away from the repository, so nothing of regla is found but by the blocker
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(f), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("q_bits", [None, 4])
def test_converted_folder_runs_on_stock_mlx_lm_without_regla(sources, tmp_path, q_bits):
    """The folder carries its model code: mlx-lm alone (regla unimportable) builds the same
    model, token for token, and its generate prints no transformers model_type warning."""
    dst = convert(sources["regla_hybrid"], tmp_path / "mlx", q_bits=q_bits, q_group_size=32, log=quiet)
    code = dst / "regla_code"
    assert {p.name for p in code.glob("*.py")} >= {"__init__.py", "model.py", "ops.py", "spec.py"}
    assert {p.name for p in (code / "metal").iterdir()} == {p.name for p in (REPO / "metal").iterdir()
                                                             if p.suffix in (".metal", ".h")}
    np.save(tmp_path / "ids.npy", IDS)
    r = run_without_regla(tmp_path, STOCK_MLX_LM, dst, tmp_path / "ids.npy", tmp_path / "out.npy")
    assert r.returncode == 0, r.stdout + r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), mlx_logits(dst).astype(np.float32))
    assert "Generation: 3 tokens" in r.stdout
    assert "model of type" not in r.stderr + r.stdout, r.stderr


def test_folder_code_is_its_own_not_an_installed_regla(sources, tmp_path):
    """The bundle is a private package: its modules never appear as regla's."""
    import sys

    from mlx_lm.utils import load_model

    dst = convert(sources["gla"], tmp_path / "mlx", log=quiet)
    before = sys.modules["regla_mlx.model"]
    model, _ = load_model(dst, trust_remote_code=True)
    assert sys.modules["regla_mlx.model"] is before
    assert type(model).__module__.startswith("_regla_model_") and type(model).__module__.endswith(".model")
    np.testing.assert_array_equal(np.array(model(mx.array(IDS)).astype(mx.float32)),
                                  mlx_logits(dst).astype(np.float32))


def _package(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_bundler_follows_every_import_form(tmp_path, monkeypatch):
    """New modules are found by following imports, whatever their form; the bundle then runs
    with the original packages gone."""
    import importlib
    import sys

    from regla.convert.bundle import BundleError, collect, write_bundle

    src = tmp_path / "src"
    _package(src, {
        "fakea/__init__.py": "from . import unused_by_model\n",
        "fakea/unused_by_model.py": "X = 1\n",
        "fakea/model.py": ("from fakeb.maths import double\nfrom . import helpers\nfrom .consts import (\n"
                           "    SCALE,\n)\nimport fakeb.late as late_mod\n\n\nclass ModelArgs:\n    pass\n\n\n"
                           "class Model:\n    def f(self, x):\n        from fakeb import lazy\n"
                           "        return lazy.inc(helpers.half(double(x))) * SCALE + late_mod.ONE\n"),
        "fakea/helpers.py": "def half(x):\n    return x / 2\n",
        "fakea/consts.py": "SCALE = 10\n",
        "fakeb/__init__.py": "",
        "fakeb/maths.py": "import math\n\n\ndef double(x):\n    return 2 * x + 0 * math.pi\n",
        "fakeb/lazy.py": "from fakea.consts import SCALE\n\n\ndef inc(x):\n    return x + SCALE - 10 + 1\n",
        "fakeb/late.py": "ONE = 1\n",
    })
    monkeypatch.syspath_prepend(str(src))
    roots = ("fakea", "fakeb")
    found = collect("fakea.model", roots)
    assert set(found) == {"fakea.model", "fakea.helpers", "fakea.consts", "fakeb.maths", "fakeb.lazy", "fakeb.late"}
    dst = tmp_path / "dst"
    dst.mkdir()
    write_bundle(dst, "fakea.model", roots)
    for name in list(sys.modules):
        if name.split(".")[0] in roots:
            del sys.modules[name]
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    sys.path.remove(str(src))
    spec = importlib.util.spec_from_file_location("custom_model", dst / "regla_model.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.Model().f(3) == (3 + 1) * 10 + 1  # double 6, half 3, inc 4, * 10, + 1
    assert not [m for m in sys.modules if m.split(".")[0] in roots]

    # two modules that would land on the same flat name, and a form that cannot be rewritten
    _package(src, {"fakeb/helpers.py": "X = 1\n", "fakea/clash.py": "from . import helpers\nfrom fakeb import helpers as h2\n",
                   "fakea/bare.py": "import fakeb.late\n"})
    sys.path.insert(0, str(src))
    with pytest.raises(BundleError, match="would both be"):
        collect("fakea.clash", roots)
    with pytest.raises(BundleError, match="binds the package name"):
        collect("fakea.bare", roots)


def test_interrupted_conversions_leave_nothing(sources, tmp_path):
    """SIGTERM mid-write removes the staging folder; one a SIGKILL left is swept by the next run."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "slow.py"
    script.write_text(
        "import sys, time\nimport mlx_lm.utils\nfrom regla.convert import convert\n"
        "real = mlx_lm.utils.save_model\n"
        "def slow(path, model, **kw):\n    real(path, model, **kw)\n    print('WRITING', flush=True)\n"
        "    time.sleep(60)\n"
        "mlx_lm.utils.save_model = slow\n"
        "convert(sys.argv[1], sys.argv[2], log=lambda *a: None)\n")
    out = tmp_path / "out"
    out.mkdir()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen([sys.executable, str(script), str(sources["gla"]), str(out / "m")],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "WRITING"
        assert leftovers(out), "the staging folder should exist while writing"
        p.send_signal(sig)
        p.wait(timeout=60)
        time.sleep(0.1)
        if sig == signal.SIGTERM:
            assert p.returncode != 0 and not leftovers(out) and not (out / "m").exists()
    assert leftovers(out) and not (out / "m").exists()  # SIGKILL runs no cleanup ...
    keep = out / ".mine.tmp-1"  # ... a look-alike folder that is not ours stays
    keep.mkdir()
    convert(sources["gla"], out / "m2", log=quiet)  # ... the next conversion sweeps it
    assert leftovers(out) == [keep.name] and (out / "m2" / "config.json").is_file()
