"""What autograd keeps for the backward of a training forward, by the source line that made it.

    python bench/saved_activations.py [--attn-type regla] [--preset 350m] [--layers 2]
                                      [--batch 1] [--seq 2048] [--top 12]

Builds the preset's model with --layers blocks, runs one forward with labels under bf16 autocast
(on CUDA if present, else the CPU) and counts the distinct storages saved for the backward,
parameters left out: the activation memory a training step holds at its peak, without a GPU.
On a CPU the attention op is the plain-torch one, not the Triton kernels' (whose saved inputs
differ), so the lines outside `ops/chunk.py` are the comparable part.
"""
import argparse
import collections
import os
import sys
import traceback

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attn-type", default="regla")
    ap.add_argument("--preset", default="350m")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    from regla import spec
    from regla_torch import ReGLAConfig, ReGLAForCausalLM
    from regla_torch.train import PRESETS

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = dict(PRESETS[a.preset], num_hidden_layers=a.layers)
    args = spec.ModelArgs(attn_type=a.attn_type, vocab_size=a.vocab, **p)
    torch.manual_seed(0)
    with torch.device(dev):
        model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in params:
            ours = [f for f in traceback.extract_stack()
                    if os.path.abspath(f.filename).startswith(os.path.abspath(ROOT)) and f.filename != __file__]
            where = f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno}" if ours else "?"
            seen[key] = (t.untyped_storage().nbytes(), where)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(dev, torch.bfloat16):
        model(input_ids=ids, labels=ids, use_cache=False)
    by_line = collections.Counter()
    for nbytes, where in seen.values():
        by_line[where] += nbytes
    total = sum(by_line.values())
    print(f"{a.attn_type}, preset {a.preset} with {a.layers} blocks, {a.batch} x {a.seq} tokens, bf16 autocast on "
          f"{dev}: {total / 2**20:,.0f} MiB saved for the backward ({total / 2**20 / a.layers:,.0f} MiB a block, "
          "the embedding and loss included)")
    rest = sum(n for w, n in by_line.items() if not w.startswith("regla_torch/ops/chunk.py"))
    print(f"  outside regla_torch/ops/chunk.py (the attention op): {rest / 2**20:,.0f} MiB")
    for where, nbytes in by_line.most_common(a.top):
        print(f"  {nbytes / 2**20:8.1f} MiB  {where}")


if __name__ == "__main__":
    main()
