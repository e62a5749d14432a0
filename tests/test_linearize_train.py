"""Recovery training of a linearized model through `regla train`: --init-from, the attention-
transfer stage, the KL stage, resume, and the CLI end to end (tiny random Llama, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regla_torch.linearize import linearize
from regla_torch.train import TrainConfig, TrainError, train
from test_linearize import tiny_teacher
from test_train import make_corpus


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama teacher, its all-softmax twin (the teacher as a regla checkpoint), and a regla
    linearization keeping layer 1 softmax."""
    tmp = tmp_path_factory.mktemp("lin")
    # weights of std 0.1 rather than transformers' 0.02: logits far enough from uniform that the
    # KL between teacher and student is a clear signal
    folder, _ = tiny_teacher(tmp, "llama", initializer_range=0.1)
    quiet = dict(log=lambda *a: None)
    return {"teacher": linearize(folder, tmp / "teacher", softmax_layers="all", **quiet),
            "student": linearize(folder, tmp / "student", attn_type="regla", softmax_layers=[1], **quiet),
            "data": make_corpus(tmp / "data")}


def cfg_for(models, out, **kw):
    base = dict(data=[str(models["data"])], out=str(out), init_from=str(models["student"]), seq_len=32,
                batch_size=4, max_steps=10, lr=3e-3, warmup_steps=2, eval_interval=5, eval_batches=2,
                save_interval=5, log_interval=1, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def records(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in records(out) if r["step"] > 0]


def state(folder):
    from regla import checkpoint

    return checkpoint.read_weights(folder, "pt")


def test_transfer_stage_trains_only_the_linear_attention_and_lowers_its_loss(models, tmp_path):
    out = tmp_path / "transfer"
    train(cfg_for(models, out, stage="transfer", teacher=str(models["teacher"]), max_steps=20, eval_interval=10))
    recs = records(out)
    assert recs[0]["step"] == 0 and "val_transfer" in recs[0]  # the linearized model before any step
    evals = [r["val_transfer"] for r in recs if "val_transfer" in r]
    assert len(evals) == 3 and evals[-1] < 0.7 * evals[0], evals
    before, after = state(models["student"]), state(out / "final")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith(("model.layers.0.attn.", "model.layers.2.attn.")) for k in changed)
    assert "model.layers.0.attn.q_proj.weight" in changed and "model.layers.2.attn.gk_proj.1.bias" in changed
    # the tokenizer came from the checkpoint (auto), and travels with the result
    assert (out / "final" / "tokenizer.json").exists()


def test_kl_stage_is_zero_for_the_teacher_itself_and_falls_for_the_student(models, tmp_path):
    same = tmp_path / "same"
    train(cfg_for(models, same, init_from=str(models["teacher"]), stage="kl", teacher=str(models["teacher"]),
                  max_steps=1, eval_interval=1))
    assert abs(records(same)[0]["val_kl"]) < 1e-6
    out = tmp_path / "kl"
    train(cfg_for(models, out, stage="kl", teacher=str(models["teacher"]), max_steps=16, eval_interval=8, lr=2e-3))
    evals = [r["val_kl"] for r in records(out) if "val_kl" in r]
    assert evals[-1] < 0.6 * evals[0], evals


def test_lm_stage_from_a_checkpoint_and_exact_resume(models, tmp_path):
    full = cfg_for(models, tmp_path / "full", stage="kl", teacher=str(models["teacher"]))
    train(full)

    class Crash(Exception):
        pass

    def crash(step, loss):
        if step == 7:
            raise Crash

    part = cfg_for(models, tmp_path / "part", stage="kl", teacher=str(models["teacher"]))
    with pytest.raises(Crash):
        train(part, on_step=crash)
    part.resume = True
    train(part)
    np.testing.assert_allclose(losses(tmp_path / "part"), losses(tmp_path / "full"), rtol=0, atol=1e-6)
    # a resumed run must keep its stage and teacher
    other = cfg_for(models, tmp_path / "part", stage="lm", resume=True, max_steps=12)
    with pytest.raises(TrainError, match="stage: checkpoint 'kl' vs now 'lm'"):
        train(other)
    lm = cfg_for(models, tmp_path / "lm", max_steps=6)
    train(lm)
    curve = losses(tmp_path / "lm")
    assert all(np.isfinite(curve)) and curve[-1] < curve[0]


def test_bad_stage_settings_are_refused_before_anything_is_written(models, tmp_path):
    cases = [
        (dict(stage="kl"), "needs a --teacher"),
        (dict(stage="lm", teacher=str(models["teacher"])), "drop --teacher"),
        (dict(stage="distill", teacher=str(models["teacher"])), "choose lm, kl, transfer"),
        (dict(stage="transfer", teacher=str(models["student"])), r"teacher's layers \[0, 2\] are not"),
        (dict(init_from=str(models["teacher"]), stage="transfer", teacher=str(models["teacher"])),
         "this model has none"),
        (dict(model={"attn_type": "gla"}), "drop the model fields"),
        (dict(init_from=str(tmp_path / "missing")), "--init-from"),
        (dict(stage="kl", teacher=str(tmp_path / "missing")), "--teacher"),
    ]
    for kw, match in cases:
        out = tmp_path / "run"
        with pytest.raises(TrainError, match=match):
            train(cfg_for(models, out, **kw))
        assert not out.exists()


def test_cli_linearize_then_train_transfer(models, tmp_path):
    from typer.testing import CliRunner

    from regla.cli import app

    teacher_src = tmp_path / "src"
    folder, _ = tiny_teacher(teacher_src, "llama")
    r = CliRunner().invoke(app, ["linearize", str(folder), str(tmp_path / "gla"), "--attn-type", "gla",
                                 "--softmax-layers", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "gla" / "config.json").read_text())["softmax_layers"] == [0]
    r = CliRunner().invoke(app, ["linearize", str(folder), str(tmp_path / "gla")])
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(app, ["train", "--data", str(models["data"]), "--out", str(tmp_path / "run"),
                                 "--init-from", str(tmp_path / "gla"), "--stage", "transfer", "--teacher",
                                 str(models["teacher"]), "--seq-len", "32", "--batch-size", "2", "--max-steps", "3",
                                 "--eval-interval", "3", "--eval-batches", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "step 0: val loss" in r.output and (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_transfer_stage_under_ddp_matches_one_process(models, tmp_path):
    """Two gloo processes (DDP around the stage's objective) follow the one-process curve."""
    import os
    import subprocess
    import sys

    common = ["--data", str(models["data"]), "--init-from", str(models["student"]), "--stage", "transfer",
              "--teacher", str(models["teacher"]), "--seq-len", "32", "--max-steps", "4", "--lr", "3e-3",
              "--warmup-steps", "1", "--eval-interval", "4", "--eval-batches", "2", "--save-interval", "4",
              "--seed", "2", "--no-progress"]
    one = tmp_path / "one"
    train(TrainConfig(data=[str(models["data"])], init_from=str(models["student"]), stage="transfer",
                      teacher=str(models["teacher"]), out=str(one), seq_len=32, batch_size=2, grad_accum=2,
                      max_steps=4, lr=3e-3, warmup_steps=1, eval_interval=4, eval_batches=2, save_interval=4,
                      seed=2, progress=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "regla.cli", "train", "--out", str(two), "--batch-size", "2", *common],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    np.testing.assert_allclose(losses(two), losses(one), rtol=0, atol=1e-5)
    assert len(losses(one)) == 4
