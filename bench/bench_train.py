"""Training throughput on CUDA: regla's models against fla's GLA model of the same size, one GPU.

    python bench/bench_train.py [--preset 350m] [--batch 8] [--seq 2048] [--models regla gla fla-gla gsa]
                                [--fla-configs 3] [--profile N]

A model name with "-eager" (``regla-eager``) runs that type uncompiled (``REGLA_COMPILE=0``; by
default on CUDA each block trains as one torch.compile'd graph), for a same-run comparison.

Each model: fp32 master weights, bf16 autocast, fused AdamW, random tokens, [batch, seq] rows;
tokens/s over --steps timed steps after --warmup. MFU = 6 * parameters * tokens/s over the
H200's dense bf16 peak (989 TFLOP/s); the attention's own FLOPs are left out, as is usual
for this figure.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PEAK = 989e12


def measure(model, vocab, batch, seq, warmup, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    assert torch.isfinite(loss)
    return batch * seq / dt, torch.cuda.max_memory_allocated() / 2**30, step


def kernels(step, top):
    """One more step under torch.profiler: the CUDA kernels that take most of it."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in rows)
    rows.sort(key=lambda e: -e.self_device_time_total)
    lines = [f"  one step: {total / 1e3:.1f} ms of CUDA kernels; the top {top}:"]
    for e in rows[:top]:
        lines.append(f"  {e.self_device_time_total / 1e3:8.2f} ms {e.self_device_time_total / total:6.1%} "
                     f"x{e.count:<4d} {e.key[:110]}")
    return "\n".join(lines)


def ours(attn_type, preset, vocab):
    from regla import spec
    from regla_torch import ReGLAConfig, ReGLAForCausalLM
    from regla_torch.train import PRESETS

    args = spec.ModelArgs(attn_type=attn_type, vocab_size=vocab, **PRESETS[preset])
    with torch.device("cuda"):
        return ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).train()


def fla_gla(preset, vocab):
    from fla.models import GLAConfig, GLAForCausalLM

    from regla_torch.train import PRESETS
    p = PRESETS[preset]
    cfg = GLAConfig(hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"], num_heads=p["num_heads"],
                    vocab_size=vocab, expand_k=0.5, expand_v=1.0, use_short_conv=False,
                    tie_word_embeddings=p.get("tie_word_embeddings", False))
    with torch.device("cuda"):
        return GLAForCausalLM(cfg).train()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="350m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=["regla", "gla", "fla-gla"])
    ap.add_argument("--fla-configs", type=int, default=3, help="autotune configs kept per fla kernel")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one step of each model and print its N costliest CUDA kernels "
                         "(to stderr)")
    a = ap.parse_args()
    if "fla-gla" in a.models:
        from bench_ops import limit_autotune
        limit_autotune(a.fla_configs)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; preset {a.preset}, batch {a.batch} x "
          f"{a.seq}, bf16 autocast, fused AdamW", flush=True)
    print("| model | parameters | tokens/s | MFU | peak memory |")
    print("|---|---|---|---|---|")
    res = {}
    for name in a.models:
        torch.manual_seed(0)
        # "<type>-eager": the same model with its blocks left uncompiled (REGLA_COMPILE=0)
        os.environ["REGLA_COMPILE"] = "0" if name.endswith("-eager") else "1"
        attn_type = name.removesuffix("-eager")
        model = fla_gla(a.preset, a.vocab) if name == "fla-gla" else ours(attn_type, a.preset, a.vocab)
        n = sum(p.numel() for p in model.parameters())
        tps, mem, step = measure(model, a.vocab, a.batch, a.seq, a.warmup, a.steps)
        res[name] = tps
        print(f"| {name if name == 'fla-gla' else 'regla ' + name} | {n / 1e6:.0f}M | {tps:,.0f} | "
              f"{6 * n * tps / PEAK:.1%} | {mem:.1f} GiB |", flush=True)
        if a.profile:  # now, while the model is alive, to stderr: a run cut short keeps it
            print(f"\n{name}:\n" + kernels(step, a.profile), file=sys.stderr, flush=True)
        del model, step
        torch.cuda.empty_cache()
    if "fla-gla" in res:
        print("ratios to fla-gla: " + ", ".join(f"{k} {v / res['fla-gla']:.2f}x" for k, v in res.items()
                                                if k != "fla-gla"))


if __name__ == "__main__":
    main()
