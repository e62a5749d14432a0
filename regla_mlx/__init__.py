"""MLX backend: ops (Metal kernels on Apple Silicon, pure MLX elsewhere), models, generation."""

from .generate import ChatSession, generate, load, load_model, load_tokenizer, stream_generate
from .model import Model

__all__ = ["ChatSession", "Model", "generate", "load", "load_model", "load_tokenizer", "stream_generate"]
