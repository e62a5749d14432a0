"""The model shipped in regla/default_model/ is present, small, and trained."""

import json
import math
from pathlib import Path

import torch

FOLDER = Path(__file__).resolve().parents[1] / "regla" / "default_model"


def test_default_model_is_small_and_trained():
    from transformers import AutoTokenizer

    import regla_torch

    conf = json.loads((FOLDER / "config.json").read_text())
    assert conf["model_type"] == "regla" and conf["attn_type"] == "regla"
    assert (FOLDER / "model.safetensors").stat().st_size < 30 * 2**20
    model = regla_torch.load(FOLDER, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(FOLDER)
    assert len(tok) == conf["vocab_size"]
    text = ("In the beginning God created the heaven and the earth.\nAnd the earth was without form, "
            "and void; and darkness was upon the face of the deep.")
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids, use_cache=False).loss.item()
    # an untrained model scores about ln(8192) = 9.0 nats a token
    assert loss < 0.5 * math.log(conf["vocab_size"]), loss
