"""`regla train` under torchrun (2 CPU processes, gloo) matches one process with the same
global batch: DDP, and FSDP (fully_shard) with --fsdp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from regla_torch.train import TrainConfig, train
from test_train import losses, make_corpus

COMMON = ["--preset", "tiny", "--seq-len", "32", "--max-steps", "8", "--lr", "3e-3", "--warmup-steps", "2",
          "--eval-interval", "4", "--eval-batches", "2", "--save-interval", "4", "--seed", "2", "--no-progress"]


def torchrun(tmp_path, out, *extra):
    data = tmp_path / "data" / "corpus.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "regla.cli", "train", "--data", str(data), "--out", str(out), "--batch-size", "2",
           "--grad-accum", "1", *COMMON, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, two micro-steps of 2: the same 4 sequences per step as 2 processes x 2."""
    tmp = tmp_path_factory.mktemp("single")
    data = make_corpus(tmp / "data")
    cfg = TrainConfig(data=[str(data)], out=str(tmp / "one"), preset="tiny", seq_len=32, batch_size=2, grad_accum=2,
                      max_steps=8, lr=3e-3, warmup_steps=2, eval_interval=4, eval_batches=2, save_interval=4,
                      seed=2, progress=False)
    train(cfg)
    return tmp


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, mode):
    make_corpus(tmp_path / "data")
    out = tmp_path / mode
    torchrun(tmp_path, out, *(["--fsdp"] if mode == "fsdp" else []))
    one = [json.loads(l) for l in (single / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 8
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=0, atol=1e-5)
    np.testing.assert_allclose(two[-1]["val_loss"], one[-1]["val_loss"], rtol=0, atol=1e-5)
    # its step-4 checkpoint resumes in one process (same global batch: 1 x 2 x 2 = 2 x 2 x 1)
    # and continues the same curve
    shutil.rmtree(out / "checkpoint-8")
    cfg = TrainConfig.from_json(out / "train_config.json")
    cfg.resume, cfg.grad_accum = True, 2
    train(cfg)
    np.testing.assert_allclose(losses(out), [r["loss"] for r in two], rtol=0, atol=1e-5)
