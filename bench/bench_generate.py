"""Whole-model decode speed on CUDA: regla's models (eager steps, the CUDA-graph step, the
torch.compile'd CUDA-graph step, the library's streaming loop) beside fla's own GLA model
through HF generate, batch 1 and 32.

    python bench/bench_generate.py [--preset 1.3b] [--attn-types gla regla gsa] [--new 256]
                                   [--batches 1 32] [--no-fla]

Random bf16 weights of a model of fla's gla-1.3B shape (hidden 2048, 24 layers, 4 heads,
expand_k 0.5) with each attention type. Tokens/s = batch * new tokens / time of the decode steps (prefill excluded:
fla's figure is generate(n) minus generate(1)). The graph columns feed each step's argmax
straight back on the GPU; "stream_tokens" is the library's generation loop (what ``regla
generate`` and chat run: every token goes to the host, the next step queued before it
arrives), timed from its 8th token
to its last (the prefill and the graph's capture, paid once a turn, left out). The bandwidth
bound reads every weight once per step: bytes of the parameters / 4.3 TB/s. At batch 1 on Hopper
the graph columns and stream_tokens of regla and gla run the persistent step
(``generate.persistent_step``); ``REGLA_PERSISTENT=0`` measures the per-layer launches instead.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

BW = 4.3e12


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def print_kernels(fn, title, steps=5):
    """GPU time per kernel of one step (torch.profiler sees the kernels a graph replays)."""
    from profile_ops import kernel_times

    acc = kernel_times(fn, steps)  # {name: (calls, us)} per step
    total = sum(t for _, t in acc.values())
    print(f"\n{title}: {sum(n for n, _ in acc.values()):.0f} kernels, {total:.0f} us of kernel time "
          "per step", flush=True)
    for name, (n, t) in sorted(acc.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"  {t:8.1f} us  {n:5.0f}x  {name[:100]}")


def ours(attn_type, cfg_kw, batch, prompt_len, new, profile=False):
    from regla import spec
    from regla_torch import ReGLAConfig, ReGLAForCausalLM
    from regla_torch.generate import GraphStep

    torch.manual_seed(0)
    args = spec.ModelArgs(attn_type=attn_type, **cfg_kw)
    with torch.device("cuda"):
        model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).to(torch.bfloat16).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, args.vocab_size, (batch, prompt_len), device="cuda")
    res = {}
    for mode in ("eager", "graph", "compiled"):
        cache = model.make_cache()
        with torch.no_grad():
            nxt = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            if mode != "eager":
                t0 = time.perf_counter()
                step = GraphStep(model, cache, batch, compile=mode == "compiled")
                res[mode + " setup s"] = time.perf_counter() - t0
            else:
                step = lambda x: model(x, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            for _ in range(3):  # warm-up
                nxt = step(nxt).argmax(-1, keepdim=True)

            def run():
                nonlocal nxt
                for _ in range(new):
                    nxt = step(nxt).argmax(-1, keepdim=True)
            res[mode] = batch * new / timed(run)
            if profile and mode == "compiled":
                print_kernels(lambda: step(nxt), f"compiled + graph step, batch {batch}")
    if batch == 1:  # the library's own loop: sampling on the host, a sync per token
        from regla_torch.generate import stream_tokens

        def stamps(n):
            cache = model.make_cache()
            return [time.perf_counter() for _ in stream_tokens(model, ids[0].tolist(), cache, n, {"temp": 0.0})]
        stamps(8)
        # time between the 8th token and the last (each yield waits for its step): the prefill
        # and the graph's capture, which a turn pays once, stay out of it
        t = stamps(new)
        res["stream"] = (len(t) - 8) / (t[-1] - t[7])
    return res, n_bytes, sum(p.numel() for p in model.parameters())


def fla_generate(cfg_kw, batch, prompt_len, new):
    from fla.models import GLAConfig, GLAForCausalLM

    torch.manual_seed(0)
    cfg = GLAConfig(hidden_size=cfg_kw["hidden_size"], num_hidden_layers=cfg_kw["num_hidden_layers"],
                    num_heads=cfg_kw["num_heads"], vocab_size=cfg_kw["vocab_size"], expand_k=0.5, expand_v=1.0,
                    use_short_conv=False, fuse_cross_entropy=False)
    with torch.device("cuda"):
        model = GLAForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device="cuda")
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)

    def gen(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    gen(4)  # compiles/autotunes
    t_full, t_one = timed(lambda: gen(new)), timed(lambda: gen(1))
    return batch * (new - 1) / (t_full - t_one)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--attn-types", nargs="+", default=["gla", "regla", "gsa"])
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the kernels of one compiled step")
    p.add_argument("--fla-configs", type=int, default=3, help="autotune configs kept per fla kernel")
    p.add_argument("--no-pdl", action="store_true",
                   help="launch the decode kernels plainly (default: programmatic dependent launch where the GPU has it)")
    a = p.parse_args()
    from regla_torch.ops.triton import _common
    _common.PDL = False if a.no_pdl else None
    from regla_torch.train import PRESETS
    cfg_kw = {k: v for k, v in PRESETS[a.preset].items() if k != "tie_word_embeddings"}
    cfg_kw.update(vocab_size=32000, expand_k=0.5)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; GLA {a.preset}, prompt {a.prompt}, "
          f"{a.new} new tokens, bf16, greedy, PDL {'off' if a.no_pdl else 'where supported'}", flush=True)
    print("| attn_type | batch | eager tok/s | CUDA graph tok/s | compiled + graph tok/s "
          "| stream_tokens tok/s | bound tok/s |")
    print("|---|---|---|---|---|---|---|")
    ours_graph = {}
    for attn_type in a.attn_types:
        for b in a.batches:
            res, n_bytes, n_params = ours(attn_type, cfg_kw, b, a.prompt, a.new, a.profile)
            if attn_type == "gla":
                ours_graph[b] = res["compiled"]
            stream = f"{res['stream']:,.0f}" if "stream" in res else "-"
            print(f"| {attn_type} | {b} | {res['eager']:,.0f} | {res['graph']:,.0f} | {res['compiled']:,.0f} | "
                  f"{stream} | {b * BW / n_bytes:,.0f} |  (setup: capture {res['graph setup s']:.1f} s, "
                  f"compile + capture {res['compiled setup s']:.1f} s; {n_params / 1e9:.2f}B parameters)",
                  flush=True)
    if not a.no_fla:  # after ours: fla's first generate compiles and autotunes for minutes
        from bench_ops import limit_autotune
        limit_autotune(a.fla_configs)
        for b in a.batches:
            try:
                fla = fla_generate(cfg_kw, b, a.prompt, a.new)
                ratio = f"; regla gla compiled graph / fla = {ours_graph[b] / fla:.1f}x" if b in ours_graph else ""
                print(f"fla GLA through HF generate, batch {b}: {fla:,.0f} tok/s{ratio}", flush=True)
            except Exception as e:  # report, keep our figures
                print(f"fla failed at batch {b}: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
