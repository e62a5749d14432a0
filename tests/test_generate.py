"""MLX loading and generation on mlx-lm's utilities; both backends agree token for token."""

import numpy as np
import pytest

pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.tokenizer_utils import TokenizerWrapper  # noqa: E402

import regla_mlx  # noqa: E402
import regla_torch  # noqa: E402
from helpers_checkpoints import all_sources  # noqa: E402
from regla.convert import convert  # noqa: E402

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    srcs = all_sources(root / "src")
    srcs["regla_mlx"] = convert(srcs["regla_ctx"], root / "regla_mlx", log=lambda *a: None)
    return srcs


def greedy_torch(folder, prompt, n):
    """transformers' own generate (greedy), as the PyTorch reference."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    m = regla_torch.load(folder)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = m.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def greedy_mlx(model, tokenizer, prompt, n, **kw):
    return [r.token for r in regla_mlx.stream_generate(model, tokenizer, prompt, n + 1, **kw)][:n]


@pytest.mark.parametrize("name", ["gla", "gsa", "regla", "regla_hybrid", "regla_ctx"])
def test_greedy_generation_is_the_same_on_both_backends(sources, name):
    model, tok = regla_mlx.load(sources[name])  # an HF/fla folder, converted in memory
    assert isinstance(tok, TokenizerWrapper)
    tok._eos_token_ids = set()  # compare a fixed number of tokens, whatever they are
    n = 24
    assert greedy_mlx(model, tok, PROMPT, n) == greedy_torch(sources[name], PROMPT, n)


def test_load_mlx_folder_and_generate_text(sources):
    model, tok = regla_mlx.load(sources["regla_mlx"])
    text = regla_mlx.generate(model, tok, PROMPT, max_tokens=12)
    ids = greedy_mlx(model, tok, PROMPT, 12)
    assert isinstance(text, str) and text == tok.decode(ids[: len(ids)]) or len(ids) < 12


def test_generate_matches_token_stream_and_stops_on_eos(sources):
    model, tok = regla_mlx.load(sources["regla_mlx"])
    tok._eos_token_ids = set()
    free = greedy_mlx(model, tok, PROMPT, 10)
    # make the 4th greedy token the EOS: generation must stop right before it
    tok._eos_token_ids = {free[3]}
    stopped = [r for r in regla_mlx.stream_generate(model, tok, PROMPT, 10)]
    assert stopped[-1].finish_reason == "stop"
    assert [r.token for r in stopped[:-1]] == free[:3]


def test_decode_cost_is_constant_per_token(sources):
    """The linear layers' cache has the same size after 5 and after 200 tokens, and stepping
    token by token with it gives the full-sequence logits."""
    model = regla_mlx.load_model(sources["regla_mlx"])
    ids = mx.array(np.random.default_rng(1).integers(3, 250, (1, 200)))
    full = model(ids)
    cache = model.make_cache()
    sizes, steps = [], []
    for t in range(ids.shape[1]):
        steps.append(model(ids[:, t:t + 1], cache=cache))
        if t in (4, 199):
            sizes.append(sum(a.nbytes for _, a in tree_flatten([c.state for c in cache]) if a is not None))
    assert sizes[0] == sizes[1]
    stepped = mx.concatenate(steps, 1)
    assert float(mx.abs(stepped - full).max() / mx.abs(full).max()) < 1e-5


def test_sampling_options(sources):
    model, tok = regla_mlx.load(sources["regla_mlx"])
    tok._eos_token_ids = set()
    greedy = greedy_mlx(model, tok, PROMPT, 16)
    # a nucleus this small or a min-p of 1 keeps only the top token: greedy again, at any temperature
    assert greedy_mlx(model, tok, PROMPT, 16, temp=1.5, top_p=1e-9) == greedy
    assert greedy_mlx(model, tok, PROMPT, 16, temp=1.5, min_p=1.0) == greedy
    mx.random.seed(3)
    a = greedy_mlx(model, tok, PROMPT, 16, temp=1.0)
    mx.random.seed(3)
    assert greedy_mlx(model, tok, PROMPT, 16, temp=1.0) == a
    assert a != greedy


def test_repetition_penalty(sources):
    model, tok = regla_mlx.load(sources["gsa"])
    tok._eos_token_ids = set()
    greedy = greedy_mlx(model, tok, PROMPT, 16)
    assert len(set(greedy)) < len(greedy) / 2  # this model loops when left alone
    # a huge penalty forbids every token of the last 20 (prompt included)
    out = greedy_mlx(model, tok, PROMPT, 16, repetition_penalty=1e6, repetition_context_size=20)
    context = list(tok.encode(PROMPT)) + out
    for i in range(len(context) - len(out), len(context)):
        assert context[i] not in context[max(0, i - 20):i]


def test_chat_session_feeds_only_the_new_turn(sources):
    model, tok = regla_mlx.load(sources["regla_mlx"])
    s = regla_mlx.ChatSession(model, tok, max_tokens=8, sampling={"temp": 0.0})
    assert s.use_template
    t1 = s.ask("hello there")
    read_after_1 = list(s.tokens)
    t2 = s.ask("how are you?")
    # turn 2 read only its own tokens: the template's rendering of the new user turn
    delta = tok.apply_chat_template(s.history[:2] + [{"role": "user", "content": "how are you?"}],
                                    add_generation_prompt=True, tokenize=False)
    full_tokens = len(tok.encode(delta, add_special_tokens=False))
    assert t2.prompt_tokens < full_tokens - len(read_after_1) // 2
    assert s.tokens[: len(read_after_1)] == read_after_1
    np.testing.assert_allclose(state_after(model, s.tokens), flat_state(s.cache), rtol=1e-5, atol=1e-6)
    # and the answer is what a fresh model gives after reading every token from scratch
    prefix = s.tokens[: len(read_after_1) + t2.prompt_tokens]
    fresh = [r.text for r in regla_mlx.stream_generate(model, tok, prefix, 8)]
    assert "".join(fresh) == t2.text
    # (the model does notice: without the first turn the answer changes)
    forgetful = [r.text for r in regla_mlx.stream_generate(model, tok, [1] + prefix[len(read_after_1):], 8)]
    assert "".join(forgetful) != t2.text
    assert t1.tokens > 0 and t2.tokens_per_second > 0
    s.reset()
    assert s.tokens == [] and s.history == []
    assert s.ask("hello there").text == t1.text  # same state as at the very start


def test_ctrl_c_keeps_what_was_said(sources):
    model, tok = regla_mlx.load(sources["regla_mlx"])
    tok._eos_token_ids = set()
    s = regla_mlx.ChatSession(model, tok, max_tokens=30, sampling={"temp": 0.0})
    seen = []

    def interrupt_after_three(text):
        seen.append(text)
        if len(seen) == 3:
            raise KeyboardInterrupt

    t = s.ask("hello there", on_text=interrupt_after_three)
    # (a token can be a partial UTF-8 byte that shows no text: at least three tokens were made)
    assert t.interrupted and 3 <= t.tokens < 30 and t.text == "".join(seen)
    # the state is exactly "prompt + the tokens shown", read once: as if read from scratch
    assert len(s.tokens) == t.prompt_tokens + t.tokens
    np.testing.assert_allclose(state_after(model, s.tokens), flat_state(s.cache), rtol=1e-5, atol=1e-6)
    # (a state that had also kept the half-finished step would be off)
    assert not np.allclose(state_after(model, s.tokens + s.tokens[-1:]), flat_state(s.cache), rtol=1e-3)
    t2 = s.ask("and then?")
    assert not t2.interrupted and t2.tokens == 30
    np.testing.assert_allclose(state_after(model, s.tokens), flat_state(s.cache), rtol=1e-5, atol=1e-6)


def flat_state(cache):
    return np.concatenate([np.array(a).ravel() for _, a in tree_flatten([c.state for c in cache])
                           if a is not None])


def state_after(model, ids):
    cache = model.make_cache()
    model(mx.array(ids)[None], cache=cache)
    return flat_state(cache)


def test_torch_load_of_hub_style_folders(sources):
    for name in ("gla", "gsa", "regla"):
        m = regla_torch.load(sources[name])
        assert isinstance(m, regla_torch.ReGLAForCausalLM) and not m.training
