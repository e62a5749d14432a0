"""Copy a trained model folder into ``regla/default_model/`` as the package ships it:
config.json, one ``model.safetensors`` (the shards a size-limited export wrote, merged), and
the tokenizer files. Usage: ``python examples/pack_default_model.py SRC [DST] [--tokenizer DIR]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from regla import checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def pack(src: Path, dst: Path, tokenizer: Path | None = None):
    weights = checkpoint.read_weights(src, "pt")
    args = checkpoint.read_args(src)  # fails clearly on a folder that is not a model
    from regla.spec import check_weights

    check_weights(weights, args)
    tok = tokenizer or src
    missing = [n for n in TOKENIZER_FILES[:2] if not (tok / n).exists()]
    if missing:
        raise SystemExit(f"{tok} lacks {', '.join(missing)}: pass --tokenizer with the training tokenizer")
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the destination and swapped in, so the package never holds half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".default_model-", dir=dst.parent))
    save_file({k: v.contiguous() for k, v in sorted(weights.items())}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    conf = json.loads((src / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    for n in TOKENIZER_FILES:
        if (tok / n).exists():
            shutil.copy(tok / n, tmp / n)
    # mkdtemp and safetensors create owner-only files; a packaged model must be readable by all
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {dst}: {sum(v.numel() for v in weights.values()) / 1e6:.2f}M parameters, "
          f"{(dst / 'model.safetensors').stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path, nargs="?", default=Path(__file__).resolve().parents[1] / "regla" / "default_model")
    ap.add_argument("--tokenizer", type=Path)
    a = ap.parse_args()
    pack(a.src, a.dst, a.tokenizer)
