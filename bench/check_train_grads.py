"""Packed bf16 training through the Triton op, checked against the plain-torch op (CUDA only).

    python3 bench/check_train_grads.py --data train_data [--hidden 256 --layers 4] [--steps 400]
        [--lr 2e-3] [--check-every 20] [--spike 20]

Trains a regla model on random 512-token windows of DATA/train.bin, 16 per packed row (bf16
autocast), with
AdamW and a linear warmup. Every --check-every steps, and at every step whose gradient norm
exceeds --spike, each chunk-op call of that step is re-run through the Triton kernels and
through the plain-torch op in fp32 with the same inputs and output gradient, and the rel. RMS
errors of o, dq, dk, dv, dg are printed. At a spike the whole batch is also run through the
plain-torch op, so the two gradient norms can be compared: the same norm means the spike
comes from the model, not from the kernels.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import regla_torch.model as M  # noqa: E402
from regla import spec  # noqa: E402
from regla_torch import ReGLAConfig, ReGLAForCausalLM  # noqa: E402
from regla_torch.data import pack  # noqa: E402
from regla_torch.ops import chunk_gla  # noqa: E402
from regla_torch.ops.triton import chunk_gla as triton_chunk_gla  # noqa: E402


def plain_chunk_gla(*args, **kw):
    """The plain-torch op on any device: the dispatcher with its documented switch off."""
    old = os.environ.get("REGLA_TRITON")
    os.environ["REGLA_TRITON"] = "0"
    try:
        return chunk_gla(*args, **kw)
    finally:
        if old is None:
            del os.environ["REGLA_TRITON"]
        else:
            os.environ["REGLA_TRITON"] = old


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


class Recorder:
    """Stands in for the model's chunk op: runs Triton (or plain torch) and keeps each call's
    inputs and output gradient."""

    def __init__(self):
        self.calls, self.plain = [], False

    def __call__(self, q, k, v, g, scale, S0, use_cache, cu):
        f = plain_chunk_gla if self.plain else triton_chunk_gla
        o, S = f(q, k, v, g, scale=scale, initial_state=S0, output_final_state=use_cache, cu_seqlens=cu)
        if not self.plain and o.requires_grad:
            rec = dict(inp=[x.detach() for x in (q, k, v, g)], scale=scale, cu=cu)
            o.register_hook(lambda d: rec.__setitem__("do", d.detach()))
            self.calls.append(rec)
        return o, S


def compare(rec):
    q, k, v, g = rec["inp"]
    ins = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o, _ = triton_chunk_gla(*ins, scale=rec["scale"], cu_seqlens=rec["cu"])
    o.backward(rec["do"])
    ref = [x.float().clone().requires_grad_() for x in (q, k, v, g)]
    ro, _ = plain_chunk_gla(*ref, scale=rec["scale"], cu_seqlens=rec["cu"])
    ro.backward(rec["do"].float())
    return [rel(o.float(), ro)] + [rel(a.grad.float(), b.grad) for a, b in zip(ins, ref)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--check-every", type=int, default=20)
    ap.add_argument("--spike", type=float, default=20.0)
    ap.add_argument("--max-spikes", type=int, default=3)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--rows", type=int, default=16, help="windows packed into one row")
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs the kernels in Triton's interpreter "
                    "(set TRITON_INTERPRET=1; tiny shapes, fp32 only)")
    a = ap.parse_args()
    dev = torch.device(a.device)

    rec = Recorder()
    M.chunk_gla = rec
    tokens = np.memmap(os.path.join(a.data, "train.bin"), dtype=np.uint16, mode="r")
    rng = np.random.default_rng(1)
    args = spec.ModelArgs(attn_type="regla", vocab_size=8192, hidden_size=a.hidden, num_hidden_layers=a.layers,
                          num_heads=a.heads, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))

    def fwd_bwd(ids, labels, cu):
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(input_ids=ids, labels=labels, cu_seqlens=cu, use_cache=False).loss
        loss.backward()
        return loss, torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()

    spikes, t0 = 0, time.time()
    for step in range(1, a.steps + 1):
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, step / a.warmup)
        starts = rng.integers(0, len(tokens) - a.window - 1, size=a.rows)
        ids, labels, cu = pack([np.asarray(tokens[s:s + a.window]).astype(np.int64) for s in starts], 0)
        ids, labels = torch.from_numpy(ids).to(dev), torch.from_numpy(labels).to(dev)
        cu = torch.from_numpy(cu).to(dev, torch.int32)
        rec.calls.clear()
        loss, gn = fwd_bwd(ids, labels, cu)
        spike = not np.isfinite(gn) or gn > a.spike
        if spike or step % a.check_every == 0:
            errs = np.array([compare(r) for r in rec.calls]).max(0)
            print(f"step {step} loss {loss.item():.3f} gnorm {gn:.3g} | worst rel. RMS over the step's op calls "
                  f"o {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} dg {errs[4]:.1e} "
                  f"| {time.time() - t0:.0f}s", flush=True)
        if spike:
            spikes += 1
            top = sorted(((p.grad.norm().item(), n) for n, p in model.named_parameters() if p.grad is not None),
                         reverse=True)[:3]
            kept = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            rec.plain = True
            _, gp = fwd_bwd(ids, labels, cu)
            rec.plain = False
            print(f"  spike: gradient norm {gn:.3g} through Triton, {gp:.3g} through the plain-torch op; "
                  f"largest: {', '.join(f'{n} {v:.3g}' for v, n in top)}", flush=True)
            for n, p in model.named_parameters():
                p.grad = kept.get(n)
            if spikes >= a.max_spikes:
                break
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    print(f"done: {step} steps, {spikes} spikes")


if __name__ == "__main__":
    main()
