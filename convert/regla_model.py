"""mlx-lm ``model_file`` for regla checkpoints: with ``trust_remote_code``, stock
``mlx_lm.generate --model DST`` imports this file and builds the model from it.
The architecture lives in the installed ``regla`` package; this file only points at it."""

from regla_mlx.model import Model, ModelArgs  # noqa: F401
