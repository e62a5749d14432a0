"""`regla chat`, `regla generate` and `regla parity` driven like a user would, both backends."""

import re

import numpy as np
import pytest

pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

import regla_mlx  # noqa: E402
from helpers_checkpoints import write_regla  # noqa: E402
from regla.cli import app  # noqa: E402
from regla_torch.generate import ChatSession as TorchChatSession  # noqa: E402
from regla.convert import convert  # noqa: E402

SPEED = re.compile(r"\[(\d+) tokens, [\d.]+ tokens/s(, interrupted)?\]")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    hf = write_regla(root / "hf", seed=5, std=0.3)
    return {"hf": hf, "mlx": convert(hf, root / "mlx", log=lambda *a: None)}


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def answers_of(output):
    """The streamed answers: the text between each prompt and its speed line."""
    out = []
    for chunk in output.split(">>> ")[1:]:
        m = SPEED.search(chunk)
        if m:
            out.append(chunk[: m.start()].rstrip("\n"))
    return out


def expected_answers(folder, turns, max_tokens):
    model, tok = regla_mlx.load(folder)
    s = regla_mlx.ChatSession(model, tok, max_tokens, {"temp": 0.0})
    out = []
    for t in turns:
        if t == "/reset":
            s.reset()
        else:
            out.append(s.ask(t).text)
    return out


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_chat_two_turns_reset_and_eof(model_dirs, backend):
    folder = model_dirs["mlx" if backend == "mlx" else "hf"]
    turns = ["hello there", "how are you?", "/reset", "hello there"]
    r = run("chat", "--model", folder, "--temp", "0", "--max-tokens", "12", "--backend", backend,
            input="\n".join(turns) + "\n")  # then end of input, as Ctrl-D
    assert r.exit_code == 0, r.output
    assert "chat template" in r.output and "(conversation cleared)" in r.output
    assert len(SPEED.findall(r.output)) == 3
    got = answers_of(r.output)
    want = expected_answers(model_dirs["mlx"], turns, 12)
    assert [g.strip() for g in got] == [w.strip() for w in want]
    assert got[0] == got[2]  # /reset really forgot the first exchange
    assert got[1] != got[0]


def test_plain_continuation_without_a_chat_template(model_dirs, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(model_dirs["mlx"], plain)
    (plain / "chat_template.jinja").unlink()
    r = run("chat", "--model", plain, "--temp", "0", "--max-tokens", "6", input="the cat\nsat on\n")
    assert r.exit_code == 0 and "plain continuation" in r.output and len(SPEED.findall(r.output)) == 2
    model, tok = regla_mlx.load(plain)
    assert not tok.chat_template
    s = regla_mlx.ChatSession(model, tok, 6, {"temp": 0.0})
    assert [a.strip() for a in answers_of(r.output)] == [s.ask("the cat").text.strip(), s.ask("sat on").text.strip()]


def test_quit_ends_the_session(model_dirs):
    r = run("chat", "--model", model_dirs["mlx"], "--temp", "0", "--max-tokens", "4",
            input="hello\n/quit\nnever asked\n")
    assert r.exit_code == 0 and len(SPEED.findall(r.output)) == 1


def test_torch_session_keeps_the_same_conversation_state_as_mlx(model_dirs):
    """The PyTorch chat feeds each turn into its RecurrentCache; its greedy answers equal MLX's,
    also on the turns that depend on the state carried over."""
    from transformers import AutoTokenizer

    import regla_torch

    tm = regla_torch.load(model_dirs["hf"])
    ts = TorchChatSession(tm, AutoTokenizer.from_pretrained(model_dirs["hf"]), 10, {"temp": 0.0})
    model, tok = regla_mlx.load(model_dirs["mlx"])
    ms = regla_mlx.ChatSession(model, tok, 10, {"temp": 0.0})
    for msg in ["hello there", "what is the capital of france?", "the cat sat"]:
        a, b = ts.ask(msg), ms.ask(msg)
        assert a.text == b.text and a.tokens == b.tokens
    # the cache read the whole conversation exactly once: as long as the tokens seen minus those
    # waiting to be fed with the next turn (here, off CUDA, the last sampled token)
    assert ts.cache.seen_tokens == len(ts.seen) - len(ts.pending)


def test_torch_ctrl_c_restores_the_state(model_dirs):
    from transformers import AutoTokenizer

    import regla_torch

    tm = regla_torch.load(model_dirs["hf"])
    ts = TorchChatSession(tm, AutoTokenizer.from_pretrained(model_dirs["hf"]), 10, {"temp": 0.0})
    calls = []

    def interrupt(text):
        calls.append(text)
        if len(calls) == 2:
            raise KeyboardInterrupt

    ts.ask("hi")  # a first turn, so the interrupted one starts from a filled state
    before = ts.cache.seen_tokens
    t = ts.ask("hello there", on_text=interrupt)
    assert t.interrupted and ts.cache.seen_tokens == before
    # the next turn re-reads the interrupted one first, then answers: afterwards the cache holds
    # everything said except the last sampled token, exactly as if read in one go
    ts.ask("how are you?")
    ref = tm.make_cache()
    with torch.no_grad():
        tm(torch.tensor([ts.seen[:-1]]), cache=ref, use_cache=True)
    assert ts.pending == ts.seen[-1:] and ts.cache.seen_tokens == ref.seen_tokens
    for a, b in zip(ts.cache.states, ref.states):
        for x, y in zip(a, b):
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_generate_one_shot_both_backends(model_dirs):
    r1 = run("generate", "--model", model_dirs["mlx"], "--prompt", "the quick brown fox", "--max-tokens", "12")
    r2 = run("generate", "--model", model_dirs["hf"], "--prompt", "the quick brown fox", "--max-tokens", "12",
             "--backend", "torch", "--verbose")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    model, tok = regla_mlx.load(model_dirs["mlx"])
    want = regla_mlx.generate(model, tok, "the quick brown fox", max_tokens=12)
    assert r1.stdout.strip() == want.strip()
    assert r2.stdout.strip().startswith(want.strip())
    assert re.search(r"generation: \d+ tokens, [\d.]+ tokens/s", r2.output)


def test_no_default_model_is_a_clear_error(monkeypatch, tmp_path):
    import regla.cli as cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "cli.py"))
    r = run("chat", input="")
    assert r.exit_code == 1 and "no default model is bundled" in r.output and "--model" in r.output


def test_bad_model_path_is_one_line(tmp_path):
    r = run("generate", "--model", tmp_path / "missing", "--prompt", "hi")
    assert r.exit_code == 1 and "no such folder" in r.output and "Traceback" not in r.output
    r = run("chat", "--model", tmp_path, "--backend", "torch", input="")
    assert r.exit_code == 1 and "no config.json" in r.output


def test_parity_reports_the_gap(model_dirs):
    r = run("parity", model_dirs["hf"], "--greedy-tokens", "8")
    assert r.exit_code == 0, r.output
    assert "mlx vs torch" in r.output and "torch vs spec" in r.output and "parity ok" in r.output
    gaps = [float(x) for x in re.findall(r"max rel ([\d.e+-]+)", r.output)]
    assert len(gaps) == 3 and max(gaps) < 1e-4


def test_slash_commands_are_not_sent_to_the_model(model_dirs):
    r = run("chat", "--model", model_dirs["mlx"], "--temp", "0", "--max-tokens", "4",
            input="/help\n/xyz please\n//etc/hosts\n/QUIT\nnever asked\n")
    assert r.exit_code == 0, r.output
    for name in ("/help", "/reset", "/quit"):
        assert name in r.output
    assert "unknown command /xyz: /help lists the commands" in r.output
    assert len(SPEED.findall(r.output)) == 1  # only //etc/hosts reached the model, as "/etc/hosts"
    model, tok = regla_mlx.load(model_dirs["mlx"])
    want = regla_mlx.ChatSession(model, tok, 4, {"temp": 0.0}).ask("/etc/hosts").text
    assert answers_of(r.output)[-1].strip() == want.strip()


def test_quantized_mlx_folder_on_the_torch_backend_says_why(model_dirs, tmp_path):
    q = convert(model_dirs["hf"], tmp_path / "q4", q_bits=4, q_group_size=32, log=lambda *a: None)
    r = run("generate", "--model", q, "--prompt", "hi", "--backend", "torch")
    assert r.exit_code == 1 and "MLX-quantized weights (4-bit" in r.output and "PyTorch cannot read" in r.output
    assert "--backend mlx" in r.output and "--to hf" in r.output and "Traceback" not in r.output
    r = run("generate", "--model", q, "--prompt", "hi", "--max-tokens", "3")  # MLX reads it
    assert r.exit_code == 0, r.output
