"""Reading a GGUF file of a Llama-family model (llama.cpp's format) as a transformers teacher.

transformers does the work: ``load_gguf_checkpoint`` maps the GGUF metadata to a transformers
config, dequantizes every tensor with the ``gguf`` package and undoes llama.cpp's q/k row
permutation; ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` rebuilds the tokenizer (and its
chat template) from the metadata. Needs ``pip install 'regla[linearize]'`` (the gguf package).
"""

from __future__ import annotations

from pathlib import Path


def read_gguf(path) -> tuple[dict, dict, callable]:
    """``(hf_config, weights, save_tokenizer)`` as ``regla_torch.linearize.read_teacher`` returns them."""
    import torch

    from .linearize import LinearizeError

    try:
        import gguf  # noqa: F401  (transformers needs it; a clear message beats its ImportError)
    except ImportError:
        raise LinearizeError("reading GGUF files needs the gguf package: pip install 'regla[linearize]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    path = Path(path)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no per-tensor progress bar / conversion chatter
    try:
        try:
            meta = load_gguf_checkpoint(str(path), return_tensors=False)
        except Exception as e:  # gguf raises ValueError/KeyError/struct errors on damaged files
            raise LinearizeError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        cfg = dict(meta["config"])
        kind = cfg.get("model_type")
        try:
            config = AutoConfig.for_model(**cfg)
        except (ValueError, KeyError) as e:
            raise LinearizeError(f"{path}: GGUF architecture {kind!r} is not one transformers reads ({e})") from None
        # The tensor map is built from a model skeleton; on the meta device it costs no memory.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    finally:
        hf_logging.set_verbosity(level)
    weights = {k: (torch.from_numpy(v) if not isinstance(v, torch.Tensor) else v).float() for k, v in tensors.items()}
    config_dict = config.to_dict()

    def save_tokenizer(dst: Path):
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        finally:
            hf_logging.set_verbosity(level)
        tok.save_pretrained(str(dst))

    return config_dict, weights, save_tokenizer
