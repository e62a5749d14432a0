"""Whole-model check on CUDA: the Triton path against the pure-torch path, logits and gradients.

    REGLA_TRITON=1 python3 bench/check_cuda_model.py     (without it: the plain-torch path on CUDA)

Random regla / gla models (T = 300, chunk and recurrent paths), fp32 and bf16 autocast; prints
rel. RMS errors of logits and of every gradient against the pure-torch run on the CPU (fp32).
"""

import torch

import regla_torch.ops.utils as utils
from regla import spec
from regla_torch import ReGLAConfig, ReGLAForCausalLM


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def run(model, ids, device, autocast):
    model = model.to(device).train()
    model.zero_grad()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = model(ids.to(device), labels=ids.to(device), use_cache=False)
    out.loss.backward()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids.to(device), use_cache=False).logits  # a training forward returns the loss alone
    return logits.float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    torch.manual_seed(0)
    for attn_type in ("regla", "gla"):
        args = spec.ModelArgs(attn_type=attn_type, vocab_size=512, hidden_size=512, num_hidden_layers=2,
                              num_heads=4, expand_k=1.0 if attn_type == "regla" else 0.5)
        model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict()))
        ids = torch.randint(0, 512, (2, 300))
        ref_logits, ref_grads = run(model, ids, "cpu", False)
        for autocast in (False, True):
            logits, grads = run(model, ids, "cuda", autocast)
            worst = max(grads, key=lambda n: rel(grads[n], ref_grads[n]))
            print(f"{attn_type:5s} {'bf16 autocast' if autocast else 'fp32':13s} "
                  f"logits {rel(logits, ref_logits):.2e}  worst grad {worst} {rel(grads[worst], ref_grads[worst]):.2e}",
                  flush=True)
    print("Triton kernels used:", utils.use_triton(torch.zeros(1, device="cuda")))


if __name__ == "__main__":
    main()
