"""Every option of the CLI is checked before anything loads: a bad value is one usage error
(exit 2, no traceback), the same for both backends; Ctrl-C in training says how to resume."""

import json

import pytest
from typer.testing import CliRunner

from regla.cli import app


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def assert_usage_error(r, *words):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.output, r.output


SAMPLING = [
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--temp", "-1"], "--temp"),
    (["--top-p", "1.5"], "--top-p"),
    (["--min-p", "-0.1"], "--min-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--repetition-penalty", "-2"], "--repetition-penalty"),
    (["--seed", "-1"], "--seed"),
    (["--backend", "tf"], "--backend"),
]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("args,name", SAMPLING, ids=[" ".join(a) for a, _ in SAMPLING])
def test_generate_and_chat_reject_bad_sampling_options(tmp_path, backend, args, name):
    """Checked before the model is looked for: the folder does not even exist."""
    missing = tmp_path / "missing"
    extra = [] if name == "--backend" else ["--backend", backend]
    assert_usage_error(run("generate", "--prompt", "hi", "--model", missing, *extra, *args), "Invalid value", name)
    assert_usage_error(run("chat", "--model", missing, *extra, *args, input="hi\n"), "Invalid value", name)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_a_usage_error(tmp_path, backend, prompt):
    assert_usage_error(run("generate", "--prompt", prompt, "--model", tmp_path, "--backend", backend),
                       "the prompt is empty")


CONVERT = [
    (["--q-bits", "5"], "--q-bits"),
    (["--q-bits", "4", "--q-group-size", "48"], "--q-group-size"),
    (["--dtype", "f8"], "--dtype"),
    (["--to", "gguf"], "--to"),
    (["--to", "hf", "--q-bits", "4"], "--q-bits"),
]


@pytest.mark.parametrize("args,name", CONVERT, ids=[" ".join(a) for a, _ in CONVERT])
def test_convert_rejects_bad_options(tmp_path, args, name):
    assert_usage_error(run("convert", tmp_path / "missing", tmp_path / "out", *args), "Invalid value", name)
    assert not (tmp_path / "out").exists()


def test_one_dtype_spelling_with_aliases():
    from regla.cli import _dtype

    assert [_dtype(s) for s in ("bf16", "F16", "f32", "fp32", "float32", "fp16", "bfloat16")] == \
        ["bf16", "f16", "f32", "f32", "f32", "f16", "bf16"]
    for cmd in ("convert", "train"):
        h = run(cmd, "--help").output
        assert "f32" in h and "fp32" not in h


TRAIN = [
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "1"], "--seq-len"),
    (["--max-steps", "0"], "--max-steps"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--warmup-steps", "-5"], "--warmup-steps"),
    (["--time-limit", "-3"], "--time-limit"),
    (["--device", "gpu"], "--device"),
    (["--dtype", "f8"], "--dtype"),
    (["--export-dtype", "f64"], "--export-dtype"),
    (["--attn-type", "mamba"], "--attn-type"),
    (["--softmax-layers", "a,b"], "--softmax-layers"),
    (["--model", "{not json"], "--model"),
    (["--stage", "rl"], "--stage"),
]


@pytest.mark.parametrize("args,name", TRAIN, ids=[" ".join(a) for a, _ in TRAIN])
def test_train_rejects_bad_options(tmp_path, args, name):
    if name in ("--softmax-layers", "--model"):  # checked after the (lazy) PyTorch import
        pytest.importorskip("torch")
    r = run("train", "--data", tmp_path / "corpus.txt", "--out", tmp_path / "run", *args)
    assert_usage_error(r, "Invalid value", name)
    assert not (tmp_path / "run").exists()


def test_train_settings_from_a_config_file_are_checked_too(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "c.json").write_text(json.dumps({"lr": -1, "preset": "huge", "export_dtype": "fp32"}))
    r = run("train", "--config", tmp_path / "c.json", "--data", tmp_path / "x.txt", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "lr must be a number > 0" in r.output and "unknown preset 'huge'" in r.output
    assert "export_dtype" not in r.output  # fp32 is read as f32
    assert not (tmp_path / "run").exists()


def test_train_on_cuda_without_a_gpu_is_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    r = run("train", "--device", "cuda", "--data", tmp_path / "x.txt", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "no CUDA GPU" in r.output and "--device cpu" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("saved", [[], [2, 4]])
def test_ctrl_c_in_train_says_how_to_resume(tmp_path, monkeypatch, saved):
    pytest.importorskip("torch")
    import regla_torch.train as train_module

    out = tmp_path / "run"

    def interrupted(cfg, on_step=None):
        for step in saved:
            (out / f"checkpoint-{step}").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    r = run("train", "--data", tmp_path / "x.txt", "--out", out)
    assert r.exit_code == 130
    if saved:
        assert f"the last checkpoint is {out / 'checkpoint-4'}" in r.output
        assert f"regla train --out {out} --resume" in r.output
    else:
        assert "before the first checkpoint" in r.output


@pytest.mark.parametrize("args,name", [(["--attn-type", "mamba"], "--attn-type"), (["--dtype", "q8"], "--dtype"),
                                       (["--seed", "-1"], "--seed")])
def test_linearize_rejects_bad_options(tmp_path, args, name):
    r = run("linearize", tmp_path / "src", tmp_path / "dst", *args)
    assert_usage_error(r, "Invalid value", name)
    assert not (tmp_path / "dst").exists()


def test_help_lists_only_working_commands():
    h = run("--help").output
    for cmd in ("chat", "generate", "convert", "train", "parity", "spec-check", "linearize"):
        assert cmd in h
    assert "bench" not in h
    assert run("bench").exit_code == 2  # no such command
