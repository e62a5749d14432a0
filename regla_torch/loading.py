"""Read a checkpoint folder (ours or fla-hub's) into ReGLAForCausalLM without fla installed."""

from __future__ import annotations

import torch

from regla import checkpoint
from regla.spec import check_weights

from .model import ReGLAConfig, ReGLAForCausalLM


def load_checkpoint(path_or_repo, dtype=None, device=None) -> ReGLAForCausalLM:
    folder = checkpoint.resolve(path_or_repo)
    checkpoint.check_not_quantized(folder, f"run it with MLX (--backend mlx), or write a dequantized copy "
                                   f"for PyTorch with `regla convert {folder} NEW_FOLDER --to hf`")
    args = checkpoint.read_args(folder)
    weights = checkpoint.read_weights(folder, framework="pt")
    weights = checkpoint.sanitize(weights, args)
    check_weights(weights, args)
    model = model_from_weights(args, weights)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def model_from_weights(args, weights: dict) -> ReGLAForCausalLM:
    """A ReGLAForCausalLM holding ``weights`` (checked, sanitized torch tensors) without first
    allocating random ones."""
    with torch.device("meta"):
        model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict()))
    if args.tie_word_embeddings:
        weights = {**weights, "lm_head.weight": weights["model.embeddings.weight"]}
    model.load_state_dict(weights, strict=True, assign=True)
    if args.tie_word_embeddings:
        model.tie_weights()
    return model
