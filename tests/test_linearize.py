"""`regla linearize`: a tiny random transformers Llama (and Qwen2) made here is linearized; kept
all-softmax it reproduces the teacher's logits, linearized its shapes, loading and decode hold;
a tiny GGUF written with the gguf package is read back to the same model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regla import spec
from regla_torch.linearize import LinearizeError, evenly_spaced, linearize, parse_layers

transformers = pytest.importorskip("transformers")

VOCAB = 300


def tiny_tokenizer():
    from regla_torch.data import train_bpe

    text = ["the cat sat on the mat and the dog ran to the barn", "in the beginning was the word",
            "quick brown foxes jump over lazy dogs; sphinx of black quartz, judge my vow"] * 20
    tok = train_bpe(text, VOCAB)
    assert len(tok) == VOCAB
    return tok


def tiny_teacher(tmp_path, kind="llama", seed=0, **kw):
    """A random transformers model saved as a HF folder (safetensors + tokenizer)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=None)
    base.update(kw)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**base)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**base)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # random biases/norms, so a dropped or misplaced one shows
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    folder = tmp_path / f"teacher-{kind}"
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder, model.eval()


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


IDS = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 7, 120, 64, 1, 280, 33, 12, 9, 200, 150, 11, 4, 2]])

TEACHERS = {
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3-rope-headdim-bias": ("llama", dict(head_dim=12, attention_bias=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=5000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    "llama-linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "qwen2": ("qwen2", dict()),
}


@pytest.mark.parametrize("name", list(TEACHERS))
def test_all_softmax_reproduces_the_teacher(tmp_path, name):
    import regla_torch

    kind, kw = TEACHERS[name]
    folder, teacher = tiny_teacher(tmp_path, kind, **kw)
    dst = linearize(folder, tmp_path / "student", softmax_layers="all", log=lambda *a: None)
    student = regla_torch.load(dst).float()
    with torch.no_grad():
        want = teacher(IDS).logits
        got = student(IDS, use_cache=False).logits
    assert max_rel(got, want) <= 1e-5
    # the float64 spec computes the same model (it judges every backend)
    w = {k: v.double().numpy() for k, v in student.state_dict().items()}
    ref, _ = spec.model_forward(w, student.args, IDS.numpy())
    assert max_rel(ref, want.double().numpy()) <= 1e-5
    # decode through the KV cache, token by token, gives the same logits
    cache, steps = student.make_cache(), []
    with torch.no_grad():
        for t in range(IDS.shape[1]):
            steps.append(student(IDS[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert max_rel(torch.cat(steps, 1), want) <= 1e-5
    conf = json.loads((dst / "config.json").read_text())
    assert conf["softmax_layers"] == [0, 1, 2] and (dst / "tokenizer.json").exists()


def test_mlx_softmax_layers_match_the_spec_with_the_new_fields(tmp_path):
    mx = pytest.importorskip("mlx.core")
    from regla_mlx.model import Model

    args = spec.ModelArgs(attn_type="regla", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2,
                          softmax_layers=[0], softmax_num_heads=4, softmax_num_kv_heads=2, softmax_head_dim=6,
                          softmax_qkv_bias=True, softmax_o_bias=True, norm_eps=1e-5, rope_theta=500.0,
                          softmax_rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                            high_freq_factor=2.0, original_max_position_embeddings=6))
    w = spec.init_weights(args, 1, std=0.3)
    ids = np.random.default_rng(0).integers(0, 64, (1, 23))
    ref, _ = spec.model_forward(w, args, ids)
    m = Model(args)
    m.load_weights([(k, mx.array(v)) for k, v in w.items()], strict=True)
    assert max_rel(np.array(m(mx.array(ids))), ref) <= 1e-5
    cache = m.make_cache()
    steps = [np.array(m(mx.array(ids[:, t:t + 1]), cache=cache)) for t in range(ids.shape[1])]
    assert max_rel(np.concatenate(steps, 1), ref) <= 1e-5


@pytest.mark.parametrize("attn_type", ["regla", "gla", "gsa"])
def test_linear_layers_load_and_decode_like_forward(tmp_path, attn_type):
    import regla_torch

    folder, teacher = tiny_teacher(tmp_path, "llama")
    dst = linearize(folder, tmp_path / "student", attn_type=attn_type, softmax_layers=[1],
                    model={"num_slots": 8} if attn_type == "gsa" else None, log=lambda *a: None)
    student = regla_torch.load(dst).float()
    args = student.args
    assert [args.layer_type(i) for i in range(3)] == [attn_type, "softmax", attn_type]
    assert (args.num_heads, args.num_kv_heads, args.head_k_dim, args.head_v_dim) == (6, 2, 8, 8)
    sd, tsd = student.state_dict(), teacher.state_dict()
    for i in (0, 2):  # q/k/v/o, MLP and norms are the teacher's, grouped kv heads as they were
        for n in "qkvo":
            torch.testing.assert_close(sd[f"model.layers.{i}.attn.{n}_proj.weight"],
                                       tsd[f"model.layers.{i}.self_attn.{n}_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(sd[f"model.layers.{i}.mlp.down_proj.weight"],
                                   tsd[f"model.layers.{i}.mlp.down_proj.weight"], rtol=0, atol=0)
    with torch.no_grad():
        full = student(IDS, use_cache=False).logits
        cache = student.make_cache()
        steps = [student(IDS[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(IDS.shape[1])]
    assert max_rel(torch.cat(steps, 1), full) <= 1e-4
    w = {k: v.double().numpy() for k, v in student.state_dict().items()}
    ref, _ = spec.model_forward(w, args, IDS.numpy())
    assert max_rel(full, ref) <= 1e-4


def test_gates_start_at_the_documented_decays(tmp_path):
    """regla (tau 1, refined) and gla (tau 16): each head's channels forget at 1 - 2^-a, a from 5
    to 12, whatever the input."""
    import regla_torch
    from regla import layer_math as lm

    folder, _ = tiny_teacher(tmp_path, "llama")
    want = np.log1p(-np.exp2(-np.linspace(5, 12, 8)))
    for attn_type in ("regla", "gla"):
        student = regla_torch.load(linearize(folder, tmp_path / attn_type, attn_type=attn_type,
                                             log=lambda *a: None)).float()
        attn, a = student.model.layers[0].attn, student.args
        x = torch.randn(1, 5, 48)
        z_f = attn.gk_proj(x).view(1, 5, -1, 8)
        z_r = attn.gr_proj(x).view(1, 5, -1, 8) if a.use_refining_gate else None
        g = lm.log_forget_gate(lm.NUMPY, z_f.detach().double().numpy(),
                               None if z_r is None else z_r.detach().double().numpy(), a)
        np.testing.assert_allclose(g, np.broadcast_to(want, g.shape), rtol=1e-5)


def test_qwen2_biases_are_dropped_in_linear_layers_with_a_warning(tmp_path):
    folder, _ = tiny_teacher(tmp_path, "qwen2")
    with pytest.warns(UserWarning, match="q/k/v biases are dropped in the 2 linear layers"):
        dst = linearize(folder, tmp_path / "s", softmax_layers=[0], log=lambda *a: None)
    conf = json.loads((dst / "config.json").read_text())
    assert conf["softmax_qkv_bias"] is True and conf["softmax_o_bias"] is False


def test_bad_teachers_and_options_are_refused_and_nothing_is_written(tmp_path):
    folder, _ = tiny_teacher(tmp_path, "llama", rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                                                     original_max_position_embeddings=64))
    with pytest.raises(LinearizeError, match="'yarn' is not implemented"):
        linearize(folder, tmp_path / "out", softmax_layers="all", log=lambda *a: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    folder, _ = tiny_teacher(tmp_path / "b", "llama", mlp_bias=True)
    with pytest.raises(LinearizeError, match="mlp_bias"):
        linearize(folder, tmp_path / "out", log=lambda *a: None)
    folder, _ = tiny_teacher(tmp_path / "c", "llama")
    with pytest.raises(LinearizeError, match="layers 0..2"):
        linearize(folder, tmp_path / "out", softmax_layers=[3], log=lambda *a: None)
    with pytest.raises(LinearizeError, match="regla, gla or gsa"):
        linearize(folder, tmp_path / "out", attn_type="mamba", log=lambda *a: None)
    with pytest.raises(LinearizeError, match="no such folder"):
        linearize(tmp_path / "nothing", tmp_path / "out", log=lambda *a: None)
    (tmp_path / "exists").mkdir()
    with pytest.raises(LinearizeError, match="already exists"):
        linearize(folder, tmp_path / "exists", log=lambda *a: None)
    with pytest.raises(LinearizeError, match="comma-separated"):
        parse_layers("1,two")
    assert parse_layers("all", 4) == [0, 1, 2, 3] and parse_layers("3, 1") == [1, 3] and parse_layers("none") == []
    assert evenly_spaced(30, 8) == [1, 5, 9, 13, 16, 20, 24, 28] and evenly_spaced(4, 1) == [2]


# ------------------------------------------------------------------------------ GGUF
def _permute(w, n_head):
    """llama.cpp's converter reorders q/k rows for its interleaved RoPE (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tokenizer):
    """The tiny Llama as llama.cpp writes one: its tensor names, q/k permuted, fp32, gpt2 tokenizer."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(c.eos_token_id)
    w.add_bos_token_id(c.eos_token_id)
    w.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for k, v in model.state_dict().items():
        v = v.float().numpy()
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            name = "output.weight"
        else:
            i, rest = k[len("model.layers."):].split(".", 1)
            part = rest.rsplit(".", 1)[0]
            name = f"blk.{i}.{names[part]}.weight"
            if part == "self_attn.q_proj":
                v = _permute(v, c.num_attention_heads)
            elif part == "self_attn.k_proj":
                v = _permute(v, c.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_tiny_gguf_is_read_back_to_the_same_model(tmp_path):
    import regla_torch
    from transformers import AutoTokenizer

    folder, teacher = tiny_teacher(tmp_path, "llama")
    tok = AutoTokenizer.from_pretrained(folder)
    write_gguf(tmp_path / "tiny.gguf", teacher, tok)
    dst = linearize(tmp_path / "tiny.gguf", tmp_path / "student", softmax_layers="all", log=lambda *a: None)
    student = regla_torch.load(dst).float()
    with torch.no_grad():
        assert max_rel(student(IDS, use_cache=False).logits, teacher(IDS).logits) <= 1e-5
    # the tokenizer and chat template come from the GGUF metadata
    back = AutoTokenizer.from_pretrained(dst)
    text = "the cat sat on the mat"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    with pytest.raises(LinearizeError, match="not a readable GGUF"):
        (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)
        linearize(tmp_path / "bad.gguf", tmp_path / "x", log=lambda *a: None)


@pytest.mark.parametrize("attn_type", ["regla", "gsa"])
def test_output_norms_start_at_the_teachers_attention_scale(tmp_path, attn_type):
    """Each linear layer's output-norm weight is the per-channel RMS of the teacher's attention
    output there (before o_proj) on the calibration text, measured here with hooks on the
    transformers teacher itself."""
    import regla_torch
    from regla_torch.linearize import CALIBRATION_TEXT
    from transformers import AutoTokenizer

    folder, teacher = tiny_teacher(tmp_path, "llama")
    dst = linearize(folder, tmp_path / "s", attn_type=attn_type, softmax_layers=[1],
                    model={"num_slots": 8} if attn_type == "gsa" else None, log=lambda *a: None)
    assert json.loads((dst / "linearized_from.json").read_text())["norm_calibration_tokens"] > 50
    seen = {}
    hooks = [teacher.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
        lambda m, inp, i=i: seen.__setitem__(i, inp[0].detach())) for i in (0, 2)]
    ids = AutoTokenizer.from_pretrained(folder)(CALIBRATION_TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        teacher(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    student = regla_torch.load(dst).float()
    for i in (0, 2):
        o = seen[i].double()
        if attn_type == "gsa":
            want, got = o.pow(2).mean((0, 1)).sqrt(), student.model.layers[i].attn.g_norm.weight
        else:
            want = o.view(*o.shape[:2], -1, 8).pow(2).mean((0, 1, 2)).sqrt()
            got = getattr(student.model.layers[i].attn, student.args.norm_name).weight
        np.testing.assert_allclose(got.detach().double().numpy(), want.numpy(), rtol=1e-4)


def test_a_linearized_qwen2_converts_to_mlx_and_matches_torch(tmp_path):
    """The converted MLX folder (what `regla chat` runs) computes the torch model's logits, biases,
    explicit head dim and chat template included."""
    mx = pytest.importorskip("mlx.core")
    import regla_mlx
    import regla_torch
    from regla.convert import convert

    folder, _ = tiny_teacher(tmp_path, "qwen2", head_dim=10)
    with pytest.warns(UserWarning, match="biases are dropped"):
        dst = linearize(folder, tmp_path / "s", softmax_layers=[0, 2], log=lambda *a: None)
    student = regla_torch.load(dst).float()
    convert(dst, tmp_path / "mlx", log=lambda *a: None)
    model, tok = regla_mlx.load(tmp_path / "mlx")
    with torch.no_grad():
        want = student(IDS, use_cache=False).logits
    assert max_rel(np.array(model(mx.array(IDS.numpy()))), want) <= 1e-4
