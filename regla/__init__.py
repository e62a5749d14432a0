"""regla: Refining Gated Linear Attention (ReGLA), GLA and GSA language models.

``regla.spec`` is the float64 reference both backends are tested against; the backends are
``regla_torch`` (PyTorch, Triton on CUDA) and ``regla_mlx`` (MLX, Metal on Apple Silicon).
"""

__version__ = "0.1.0"
