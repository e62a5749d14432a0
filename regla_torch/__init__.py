"""PyTorch backend: transformers model classes, GLA ops (Triton on CUDA), training.

Importing registers ``ReGLAConfig`` / ``ReGLAForCausalLM`` with transformers' Auto classes,
so ``AutoModelForCausalLM.from_pretrained`` reads a regla checkpoint.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .model import RecurrentCache, ReGLAConfig, ReGLAForCausalLM

try:
    AutoConfig.register("regla", ReGLAConfig)
    AutoModelForCausalLM.register(ReGLAConfig, ReGLAForCausalLM)
except ValueError:  # already registered (module reloaded)
    pass


def load(path_or_repo, dtype=None, device=None):
    """A regla, or fla-hub gla/gsa, checkpoint (local folder or hub repo id) as a
    ``ReGLAForCausalLM``; fla itself is not needed."""
    from .loading import load_checkpoint

    return load_checkpoint(path_or_repo, dtype=dtype, device=device)


__all__ = ["ReGLAConfig", "ReGLAForCausalLM", "RecurrentCache", "load"]
