"""Saved chats: a conversation's state in a file of constant size, resumed exactly.

On MLX the file is mlx-lm's prompt-cache format (``mlx_lm.generate --prompt-cache-file``
continues it; a prompt cache of ``mlx_lm.cache_prompt`` loads into ``regla chat``); on torch a
safetensors file of the same states. A chat resumed from a file answers token for token what a
chat that never stopped answers; another model's file is refused with one line.
"""

import pytest

pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

import regla_mlx  # noqa: E402
from helpers_checkpoints import write_regla  # noqa: E402
from regla.chat import SessionError  # noqa: E402
from regla.cli import app  # noqa: E402
from regla.convert import convert  # noqa: E402
from regla_torch.generate import ChatSession as TorchChatSession  # noqa: E402
from regla_torch.generate import load_tokenizer  # noqa: E402

TURNS = ["hello there", "what is the capital of france?", "the quick brown fox"]
# A template that renders a conversation's start differently from its later turns (a default
# system turn, as SmolLM2's and many others do): a resumed chat must feed a later turn.
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<s>system\nyou are terse</s>{% endif %}"
            "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def with_template(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sess")
    hf = with_template(write_regla(root / "hf", seed=7, std=0.3, softmax_layers=[1]))  # a KV-cache layer too
    other = write_regla(root / "other", seed=8, std=0.3, hidden_size=48)
    return {"hf": hf, "mlx": convert(hf, root / "mlx", log=lambda *a: None), "other": other,
            "other_mlx": convert(other, root / "other_mlx", log=lambda *a: None)}


def sessions(dirs, backend, folder_key=None):
    if backend == "mlx":
        folder = dirs[folder_key or "mlx"]
        model, tok = regla_mlx.load(folder)
        return lambda: regla_mlx.ChatSession(model, tok, 10, {"temp": 0.0}, model_path=str(folder))
    folder = dirs[folder_key or "hf"]
    import regla_torch

    model, tok = regla_torch.load(folder), load_tokenizer(folder)
    return lambda: TorchChatSession(model, tok, 10, {"temp": 0.0}, model_path=str(folder))


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_resumed_chat_answers_as_one_that_never_stopped(dirs, backend, tmp_path):
    new = sessions(dirs, backend)
    whole = new()
    want = [whole.ask(t).text for t in TURNS]
    first = new()
    first.ask(TURNS[0])
    path = first.save(tmp_path / "chat.safetensors")
    resumed = new()
    resumed.load(path)
    assert resumed.turns == 1
    assert [resumed.ask(t).text for t in TURNS[1:]] == want[1:]
    assert not list(tmp_path.glob(".*tmp*")), "a temporary file was left behind"


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_session_of_another_model_or_backend_is_refused(dirs, backend, tmp_path):
    s = sessions(dirs, backend)()
    s.ask(TURNS[0])
    path = s.save(tmp_path / "chat.safetensors")
    stranger = sessions(dirs, backend, "other_mlx" if backend == "mlx" else "other")()
    with pytest.raises(SessionError, match="belongs to another model"):
        stranger.load(path)
    other_backend = sessions(dirs, "torch" if backend == "mlx" else "mlx")()
    with pytest.raises(SessionError, match="saved by the"):
        other_backend.load(path)
    (tmp_path / "broken.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(SessionError, match="cannot be read"):
        s.load(tmp_path / "broken.safetensors")
    with pytest.raises(SessionError, match="no such session file"):
        s.load(tmp_path / "missing.safetensors")


def test_session_file_size_is_constant_for_linear_layers(tmp_path):
    """With linear layers only, the file after 3 turns and after 30 holds the same arrays; only
    a few header bytes (the turn count, the last tokens) differ."""
    import mlx.core as mx

    root = tmp_path / "m"
    hf = write_regla(root, seed=9, std=0.3)
    model, tok = regla_mlx.load(convert(hf, tmp_path / "mlx", log=lambda *a: None))
    s = regla_mlx.ChatSession(model, tok, 8, {"temp": 0.0})
    sizes = []
    for i in range(30):
        s.ask(TURNS[i % len(TURNS)])
        if i in (2, 29):
            f = s.save(tmp_path / f"s{i}.safetensors")
            arrays = mx.load(str(f))
            sizes.append((f.stat().st_size, sum(a.nbytes for a in arrays.values())))
    assert sizes[0][1] == sizes[1][1] and abs(sizes[0][0] - sizes[1][0]) < 64, sizes


def test_mlx_session_interoperates_with_mlx_lm(dirs, tmp_path):
    """mlx-lm reads regla's file as a prompt cache; a prompt cache of mlx_lm.cache_prompt's
    making loads into a regla chat."""
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    new = sessions(dirs, "mlx")
    s = new()
    s.ask(TURNS[0])
    cache, meta = load_prompt_cache(str(s.save(tmp_path / "chat.safetensors")), return_metadata=True)
    assert meta["model"] == str(dirs["mlx"]) and "tokenizer_config" in meta
    assert len(cache) == len(s.cache)
    # what mlx_lm.cache_prompt writes: the cache of a prompt and {model, tokenizer_config}
    model = s.model
    pc = make_prompt_cache(model)
    import mlx.core as mx

    model(mx.array([s.tokenizer.encode("a prompt cached by mlx-lm")]), cache=pc)
    save_prompt_cache(str(tmp_path / "mlxlm.safetensors"), pc, {"model": str(dirs["mlx"]), "tokenizer_config": "{}"})
    t = new()
    t.load(tmp_path / "mlxlm.safetensors")
    assert t.turns == 0 and t.ask("hello").text is not None


def test_chat_cli_session_flag_and_commands(dirs, tmp_path):
    f = tmp_path / "c.safetensors"
    args = ["chat", "--model", str(dirs["mlx"]), "--temp", "0", "--max-tokens", "8", "--session", str(f)]
    r = CliRunner().invoke(app, args, input="hello there\n")
    assert r.exit_code == 0, r.output
    assert f.is_file() and "saved to" in r.output
    r = CliRunner().invoke(app, args, input="/save\n/load\nhow are you?\n")
    assert r.exit_code == 0, r.output
    assert "resumed" in r.output and "loaded" in r.output
    bad = CliRunner().invoke(app, ["chat", "--model", str(dirs["other_mlx"]), "--session", str(f)], input="")
    assert bad.exit_code == 2 and "belongs to another model" in bad.output
    nowhere = CliRunner().invoke(app, ["chat", "--session", str(tmp_path / "no" / "such.safetensors")], input="hi\n")
    assert nowhere.exit_code == 2 and "does not exist" in nowhere.output and ">>>" not in nowhere.output
