"""The training loop on CPU: learning, packing, exact resume, clear errors on bad input."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from regla_torch.data import DataError, Windows, byte_tokenizer, load_corpus, pack, write_tokens
from regla_torch.train import TrainConfig, TrainError, train

WORDS = ("the cat sat on a mat and the dog ran to the red barn while birds sang over green hills "
         "under a pale sky as rain fell softly on old stone walls").split()


def make_corpus(folder: Path, docs=60, seed=0) -> Path:
    """A JSONL corpus of short documents with learnable structure (a fixed word list)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    with open(path, "w") as fh:
        for _ in range(docs):
            start = rng.integers(len(WORDS))
            n = int(rng.integers(8, 30))
            text = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n)) + "."
            fh.write(json.dumps({"text": text}) + "\n")
    return path


def tiny(tmp_path, data, **kw) -> TrainConfig:
    base = dict(data=[str(data)], out=str(tmp_path / "run"), preset="tiny", seq_len=48, batch_size=4,
                max_steps=16, lr=3e-3, warmup_steps=3, eval_interval=8, eval_batches=2, save_interval=4,
                log_interval=1, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "log.jsonl").read_text().splitlines()]


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_loss_decreases_and_writes_hf_checkpoint(tmp_path):
    data = make_corpus(tmp_path / "data")
    cfg = tiny(tmp_path, data, max_steps=40, save_interval=20, eval_interval=20)
    metrics = train(cfg)
    curve = losses(tmp_path / "run")
    assert len(curve) == 40
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 1.0, curve
    assert math.isfinite(metrics["val_ppl"]) and metrics["val_ppl"] < 257  # better than uniform over bytes
    final = tmp_path / "run" / "final"
    from transformers import AutoTokenizer

    import regla_torch

    model = regla_torch.load(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.decode(tok("the cat sat")["input_ids"]) == "the cat sat"
    # the exported weights are the trained ones: they reproduce the last checkpoint's logits
    ck = regla_torch.load(tmp_path / "run" / "checkpoint-40")
    ids = torch.tensor([tok("the dog ran to")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ck(ids).logits)
    assert (tmp_path / "run" / "checkpoint-40" / "trainer_state.pt").exists()
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_resume_after_crash_gives_the_same_curve(tmp_path):
    data = make_corpus(tmp_path / "data")
    full = tiny(tmp_path, data, out=str(tmp_path / "full"), grad_accum=2)
    train(full)

    class Crash(Exception):
        pass

    def crash_at_10(step, loss):
        if step == 10:
            raise Crash

    part = tiny(tmp_path, data, out=str(tmp_path / "part"), grad_accum=2)
    with pytest.raises(Crash):
        train(part, on_step=crash_at_10)
    assert [p.name for p in sorted((tmp_path / "part").glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-8"]
    assert len(losses(tmp_path / "part")) == 10  # steps 9 and 10 were logged, then lost
    part.resume = True
    train(part)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(a) == len(b) == 16
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    wa = tree_digest(tmp_path / "full" / "final")
    wb = tree_digest(tmp_path / "part" / "final")
    assert wa["model.safetensors"] == wb["model.safetensors"]


@pytest.mark.parametrize("model", [dict(attn_type="gla", softmax_layers=[1]), dict(attn_type="gsa", num_slots=8)])
def test_other_layer_types_train(tmp_path, model):
    data = make_corpus(tmp_path / "data")
    train(tiny(tmp_path, data, model=model, max_steps=12, eval_interval=12, save_interval=12))
    curve = losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0]
    conf = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert conf["attn_type"] == model["attn_type"]


def test_corrupt_or_incompatible_checkpoint_is_refused_and_nothing_changes(tmp_path):
    data = make_corpus(tmp_path / "data")
    cfg = tiny(tmp_path, data, max_steps=8, save_interval=4)
    train(cfg)
    run = tmp_path / "run"
    last = run / "checkpoint-8"
    cfg.resume = True

    def refused(c, match):
        before = tree_digest(run)
        with pytest.raises(TrainError, match=match):
            train(c)
        assert tree_digest(run) == before

    # another model shape
    other = tiny(tmp_path, data, max_steps=8, save_interval=4, resume=True, model={"hidden_size": 32})
    refused(other, "model config differs")
    # another learning rate: not the same run any more
    refused(tiny(tmp_path, data, max_steps=8, save_interval=4, resume=True, lr=1e-2), "settings differ")
    # a truncated trainer state
    state = last / "trainer_state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    refused(cfg, "damaged")
    state.write_bytes(good)
    # truncated weights
    w = last / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    refused(cfg, "damaged or truncated")
    # starting over a run folder without --resume
    cfg.resume = False
    refused(cfg, "already holds checkpoints")


def test_bad_data_gives_one_clear_error(tmp_path):
    with pytest.raises(TrainError, match="no such file"):
        train(tiny(tmp_path, tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(TrainError, match="bad.jsonl:2"):
        train(tiny(tmp_path, bad))
    assert not (tmp_path / "run").exists()


def test_cli_train_and_resume(tmp_path):
    from typer.testing import CliRunner

    from regla.cli import app

    data = make_corpus(tmp_path / "data")
    out = tmp_path / "cli"
    args = ["train", "--data", str(data), "--preset", "tiny", "--seq-len", "32", "--batch-size", "2",
            "--max-steps", "6", "--save-interval", "3", "--eval-interval", "3", "--out", str(out),
            "--no-progress", "--softmax-layers", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "final" / "config.json").read_text())["softmax_layers"] == [1]
    r = CliRunner().invoke(app, args)  # same folder, no --resume
    assert r.exit_code == 1 and "pass --resume" in r.output
    r = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--no-progress"])
    assert r.exit_code == 0, r.output  # settings come from the run's train_config.json
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no such file" in r.output and not (tmp_path / "x").exists()


def test_token_files_are_memory_mapped_and_match_text(tmp_path):
    data = make_corpus(tmp_path / "data")
    tok, ids = load_corpus([data], "bytes")
    write_tokens(ids, tmp_path / "tokens.bin", len(tok))
    np.save(tmp_path / "tokens.npy", ids.astype(np.uint16))
    tok.save_pretrained(tmp_path / "tok")
    for name in ("tokens.bin", "tokens.npy"):
        _, mapped = load_corpus([tmp_path / name], str(tmp_path / "tok"))
        assert isinstance(mapped, np.memmap) or mapped.base is not None  # not read into RAM
        np.testing.assert_array_equal(np.asarray(mapped), ids)
    with pytest.raises(DataError, match="another tokenizer"):
        write_tokens(np.array([300, 1, 2]), tmp_path / "big.bin", 65536)
        load_corpus([tmp_path / "big.bin"], "bytes")


def test_bpe_tokenizer_and_byte_tokenizer_round_trip(tmp_path):
    data = make_corpus(tmp_path / "data")
    tok, ids = load_corpus([data], "bpe:300")
    assert len(tok) == 300 and ids.max() < 300
    text = "the cat sat on a mat — ünïcode ✓"
    bt = byte_tokenizer()
    assert len(bt) == 257 and bt.decode(bt(text)["input_ids"]) == text
    tok.save_pretrained(tmp_path / "t")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.eos_token == tok.eos_token


def test_packing_keeps_documents_apart():
    eos = 9
    w1 = np.array([1, 2, eos, 3, 4, 5])
    w2 = np.array([6, eos, 7, 8, 1, 2])
    ids, labels, cu = pack([w1, w2], eos)
    assert cu.tolist() == [0, 3, 6, 8, 12]
    assert ids.shape == (1, 12) and (labels[0, [3, 6, 8]] == -100).all()
    assert (labels[0, [1, 2, 4, 5, 7, 9, 10, 11]] == ids[0, [1, 2, 4, 5, 7, 9, 10, 11]]).all()
    # the model sees a document the same way alone and packed behind another one
    from regla_torch import ReGLAConfig, ReGLAForCausalLM

    torch.manual_seed(0)
    for attn in ("regla", "gsa"):
        m = ReGLAForCausalLM(ReGLAConfig(attn_type=attn, vocab_size=16, hidden_size=32, num_hidden_layers=2,
                                         num_heads=2, num_slots=4, softmax_layers=[1])).eval()
        with torch.no_grad():
            packed = m(torch.from_numpy(ids), cu_seqlens=torch.from_numpy(cu).int(), use_cache=False).logits
            alone = m(torch.from_numpy(ids[:, 3:6]), use_cache=False).logits
        torch.testing.assert_close(packed[:, 3:6], alone, rtol=1e-5, atol=1e-5)


def test_window_order_depends_only_on_seed_and_index():
    toks = np.arange(1000)
    a, b = Windows(toks, 10, seed=3), Windows(toks, 10, seed=3)
    seq = [a.sample(i)[0] for i in range(250)]
    assert [b.sample(i)[0] for i in range(250)] == seq
    assert sorted(seq[:100]) == list(range(0, 1000, 10))  # one epoch visits every window once
    assert seq[:100] != seq[100:200]  # a new order each epoch


def test_time_limit_shortens_the_run_and_still_exports(tmp_path):
    data = make_corpus(tmp_path / "data")
    metrics = train(tiny(tmp_path, data, max_steps=1000, time_limit=1.0, eval_interval=1000, save_interval=1000))
    steps = len(losses(tmp_path / "run"))
    assert 25 < steps < 1000 and metrics["step"] == steps
    assert "val_loss" in metrics  # the shortened run still ends with a validation pass
    assert (tmp_path / "run" / f"checkpoint-{steps}").exists() and (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_nan_gradient_stops_before_the_update_and_names_where_it_was_made(tmp_path, monkeypatch, grad_clip):
    """A backward that turns NaN at the last block's output from step 3 on: the error names the
    parameters just before that point first (the last block's MLP), not the lm head after it,
    and no checkpoint of a NaN update is written, with gradient clipping or without."""
    from regla_torch import model as model_mod

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    calls = {"n": 0}
    forward = model_mod.Block.forward

    def poisoned(self, h, *a, **kw):
        out, state = forward(self, h, *a, **kw)
        last = self.attn.layer_idx == self.attn.args.num_hidden_layers - 1
        if last and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 2:  # steps 1 and 2 train normally
                out = NanGrad.apply(out)
        return out, state

    data = make_corpus(tmp_path / "data")
    cfg = tiny(tmp_path, data, save_interval=2, eval_interval=100, grad_clip=grad_clip)
    monkeypatch.setattr(model_mod.Block, "forward", poisoned)
    with pytest.raises(TrainError) as e:
        train(cfg)
    msg = str(e.value)
    layers = json.loads((tmp_path / "run" / "checkpoint-2" / "config.json").read_text())["num_hidden_layers"]
    assert "step 3" in msg and "non-finite gradients" in msg, msg
    assert f"deepest first: model.layers.{layers - 1}.mlp." in msg, msg
    assert "lm_head" not in msg and "model.norm" not in msg, msg
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
