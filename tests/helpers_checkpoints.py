"""Tiny checkpoints on disk, in the formats regla must read: fla-hub gla/gsa (fla's own config
spelling, legacy keys, fused/unfused norm names, tied embeddings, bf16, shards) and regla's own
(``save_pretrained``), each with a small offline tokenizer that has a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from regla import spec

VOCAB = 300  # 256 byte-level symbols, 3 specials, a few merges
SENTENCES = [
    "the cat sat on the mat", "hello there, how are you today?", "gated linear attention keeps a state",
    "a recurrent state of fixed size", "the quick brown fox jumps over the lazy dog",
    "user: hi assistant: hello", "what is the capital of france? paris is.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def save_tokenizer(folder: Path, chat_template: bool = True):
    """A byte-level BPE trained here (no download), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    assert len(fast) <= VOCAB
    return fast


def _save_safetensors(folder: Path, weights: dict, dtype: str = "float32", shards: int = 1):
    import torch
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(getattr(torch, dtype)) for k, v in weights.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    parts = np.array_split(np.arange(len(names)), shards)
    index = {"metadata": {}, "weight_map": {}}
    for i, idx in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in idx}, str(folder / fname), metadata={"format": "pt"})
        index["weight_map"].update({names[j]: fname for j in idx})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def fla_gla_config(**over) -> dict:
    """GLAConfig as fla-hub's config.json spells it, with an old checkpoint's legacy keys."""
    cfg = {
        "architectures": ["GLAForCausalLM"], "model_type": "gla", "attn_mode": "fused_chunk",
        "vocab_size": VOCAB, "hidden_size": 64, "expand_k": 0.5, "expand_v": 1, "hidden_ratio": 4,
        "intermediate_size": None, "num_hidden_layers": 2, "num_heads": 2, "num_kv_heads": None,
        "feature_map": None, "attn": None, "use_short_conv": False, "conv_size": 4, "use_output_gate": True,
        "clamp_min": None, "hidden_act": "swish", "max_position_embeddings": 2048, "elementwise_affine": True,
        "norm_eps": 1e-6, "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, "initializer_range": 0.02, "fuse_norm": True, "fuse_swiglu": True,
        "fuse_cross_entropy": True, "torch_dtype": "float32", "transformers_version": "4.40.2",
        # keys of older fla releases, which must be ignored
        "rms_norm_eps": 1e-6, "share_conv_kernel": True, "use_rope": False, "use_gk": True, "use_gv": False,
    }
    cfg.update(over)
    return cfg


def fla_gsa_config(**over) -> dict:
    """GSAConfig as fla spells it, ``exapnd_k``/``exapnd_v`` included."""
    cfg = {
        "architectures": ["GSAForCausalLM"], "model_type": "gsa", "attn_mode": "chunk", "vocab_size": VOCAB,
        "hidden_size": 64, "gate_logit_normalizer": 8, "clamp_min": None, "exapnd_k": 1, "exapnd_v": 1,
        "hidden_ratio": 4, "intermediate_size": None, "num_hidden_layers": 2, "num_heads": 2,
        "num_kv_heads": None, "num_slots": 16, "use_short_conv": False, "conv_size": 4,
        "feature_map": "swish", "use_output_gate": False, "use_norm": True, "hidden_act": "swish",
        "elementwise_affine": True, "norm_eps": 1e-6, "norm_first": False, "fuse_norm": True,
        "max_position_embeddings": 2048, "use_cache": True, "pad_token_id": None, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False, "initializer_range": 0.02, "fuse_cross_entropy": True,
        "torch_dtype": "float32",
    }
    cfg.update(over)
    return cfg


# The usual init scale (initializer_range): random nets at larger scales amplify every rounding
# error through the layers, which would measure the net, not the conversion.
STD = 0.02


def write_fla(folder: Path, config: dict, seed: int = 0, dtype: str = "float32", shards: int = 1,
              norm_key: str | None = None, tokenizer: bool = True) -> Path:
    """An fla-hub style folder. ``norm_key`` renames the GLA head norm as fla would have stored
    it (``g_norm`` or ``g_norm_swish_gate``) regardless of the config."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    args = spec.ModelArgs.from_dict(config)
    w = spec.init_weights(args, seed, std=STD)
    if norm_key is not None:
        w = {k.replace(f".attn.{args.norm_name}.", f".attn.{norm_key}."): v for k, v in w.items()}
    _save_safetensors(folder, w, dtype, shards)
    if tokenizer:
        save_tokenizer(folder)
    return folder


def write_regla(folder: Path, seed: int = 0, std: float = STD, **over) -> Path:
    """regla's own format, written by ``ReGLAForCausalLM.save_pretrained``."""
    import torch

    from regla_torch import ReGLAConfig, ReGLAForCausalLM

    kw = dict(attn_type="regla", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=2)
    kw.update(over)
    args = spec.ModelArgs(**kw)
    model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict()))
    w = {k: torch.from_numpy(v) for k, v in spec.init_weights(args, seed, std=std).items()}
    if args.tie_word_embeddings:
        w["lm_head.weight"] = w["model.embeddings.weight"]
    model.load_state_dict(w, strict=True)
    model.save_pretrained(folder)
    save_tokenizer(Path(folder))
    return Path(folder)


def all_sources(root: Path) -> dict:
    """Every source format the converter must handle, keyed by a short name."""
    root = Path(root)
    return {
        "gla": write_fla(root / "gla", fla_gla_config()),
        "gla_tied_unfused": write_fla(root / "gla_tied", fla_gla_config(tie_word_embeddings=True, fuse_norm=False),
                                      seed=1),
        "gla_renamed_norm": write_fla(root / "gla_gnorm", fla_gla_config(), seed=2, norm_key="g_norm"),
        "gla_bf16_sharded": write_fla(root / "gla_bf16", fla_gla_config(torch_dtype="bfloat16"), seed=3,
                                      dtype="bfloat16", shards=3),
        "gsa": write_fla(root / "gsa", fla_gsa_config(), seed=4),
        "regla": write_regla(root / "regla", seed=5),
        "regla_hybrid": write_regla(root / "regla_hybrid", seed=6, softmax_layers=[1], num_kv_heads=1,
                                    tie_word_embeddings=True),
        # weights large enough that the answer depends on tokens read long ago: the tests of
        # state carried between chat turns need a model that would notice a wrong state
        "regla_ctx": write_regla(root / "regla_ctx", seed=5, std=0.3),
    }
