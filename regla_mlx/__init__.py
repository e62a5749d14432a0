"""MLX backend: ops (Metal kernels on Apple Silicon, pure MLX elsewhere) and models."""
