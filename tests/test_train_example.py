"""examples/train_tiny_then_chat.py: train on CPU, convert to MLX, same greedy tokens."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_then_chat.py"


def test_train_tiny_then_chat(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny_then_chat", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    torch_ids, mlx_ids, text = ex.main(tmp_path, steps=40, n=16)
    assert torch_ids == mlx_ids and len(torch_ids) == 16
    assert text.strip()  # it continues the prompt with something
    assert (tmp_path / "run" / "final" / "config.json").exists() and (tmp_path / "mlx" / "config.json").exists()
