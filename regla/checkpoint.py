"""Checkpoint folders: find them, read their config and safetensors, name problems clearly.

Framework-free (safetensors loads into torch, MLX or NumPy as asked), so the torch loader,
the MLX loader and the converter share one reading of every format: ours, fla-hub's
gla/gsa (old configs included), sharded or not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .spec import ConfigError, ModelArgs


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message says what is wrong and what to do."""


def resolve(path_or_repo) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (or taken from the cache when
    ``HF_HUB_OFFLINE=1``) with huggingface-hub's progress bars."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; give the checkpoint's folder (with config.json)")
    s = str(path_or_repo)
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise CheckpointError(f"{s}: no such folder (and not a hub repo id like 'fla-hub/gla-340M-15B')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                         "*.jinja", "tokenizer*"]))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{s}: not in the local hub cache and no download possible "
                              f"(HF_HUB_OFFLINE is {os.environ.get('HF_HUB_OFFLINE', 'unset')}): {e}") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{s}: the hub refused the download: {e}") from None


def read_config(folder: Path) -> dict:
    f = Path(folder) / "config.json"
    if not f.exists():
        raise CheckpointError(f"{folder} has no config.json: is this a model folder?")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is damaged") from None


def read_args(folder: Path) -> ModelArgs:
    cfg = read_config(folder)
    try:
        return ModelArgs.from_dict(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: a field has the wrong type ({e})") from None


def check_not_quantized(folder: Path, what_to_do: str):
    """Raise when ``folder`` holds MLX-quantized weights (packed integers with per-group scales),
    which only MLX reads; ``what_to_do`` ends the message."""
    quant = read_config(folder).get("quantization")
    if quant:
        raise CheckpointError(f"{folder} holds MLX-quantized weights ({quant.get('bits', '?')}-bit, "
                              f"groups of {quant.get('group_size', '?')}), which PyTorch cannot read: {what_to_do}")


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder}: shards named in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        if list(folder.glob("*.bin")):
            raise CheckpointError(f"{folder} holds only PyTorch .bin weights; save it with "
                                  "safetensors (model.save_pretrained(..., safe_serialization=True))")
        raise CheckpointError(f"{folder} has no model*.safetensors weights")
    return files


def read_weights(folder: Path, framework: str = "numpy") -> dict:
    """Every tensor of the checkpoint, as ``framework`` arrays ("pt", "mlx" or "numpy")."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for f in weight_files(folder):
        try:
            if framework == "mlx":
                # mx.load, not safetensors' "mlx" framework: that goes through NumPy, which has
                # no bfloat16
                import mlx.core as mx

                out.update(mx.load(str(f)))
                continue
            with safe_open(str(f), framework=framework) as sf:
                for k in sf.keys():
                    out[k] = sf.get_tensor(k)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f} cannot be read ({e}); the file is damaged or truncated: "
                                  "download or convert it again") from None
    return out


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """fla spellings to the ones ``args`` expects: ``g_norm`` vs ``g_norm_swish_gate`` (fla
    names the GLA head norm by whether it was fused), and buffers that are not weights."""
    out = {}
    want = args.norm_name
    other = "g_norm" if want == "g_norm_swish_gate" else "g_norm_swish_gate"
    for k, v in weights.items():
        if k.endswith("rotary.inv_freq") or k.endswith("rotary_emb.inv_freq"):
            continue
        if args.attn_type == "gla" and f".attn.{other}." in k:
            k = k.replace(f".attn.{other}.", f".attn.{want}.")
        out[k] = v
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out
