"""The ReGLA claim at small scale: ReGLA, GLA, softmax and the ablations of MATH.md, trained on
the same data with the same token budget, all at once on one GPU; then validation perplexity at
512, 2K and 8K tokens (length extrapolation), a table and a plot of the validation curves.

    python bench/ablate.py train --data train_data --out runs/ablate --steps 1000
    python bench/ablate.py report runs/ablate          # table (markdown) + runs/ablate/curves.png

`train` runs every configuration below as its own `regla train` process (small models leave
most of an H200 idle, so they share it), then `eval` on each final model. `--only` picks runs.
The corpus folder is what examples/prepare_default_corpus.py writes (train.bin, val.bin,
tokenizer/).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

# name -> (description, extra `regla train` flags); all share --preset and the budget
RUNS = {
    "regla": ("ReGLA: safe-exp map, refining gate, RMSNorm, tau 1", []),
    "gla": ("GLA: identity map, no refining gate, tau 16", ["--attn-type", "gla"]),
    "softmax": ("softmax (Llama-style, RoPE), every layer", ["--softmax-layers", "ALL"]),
    "hybrid": ("ReGLA with half the layers softmax (odd layers)", ["--softmax-layers", "ODD"]),
    "regla-identity": ("ReGLA, identity feature map", ["--model", '{"feature_map": "identity"}']),
    "regla-identity-nonorm": ("ReGLA, identity map, no norm", ["--model", '{"feature_map": "identity", "attn_norm": "none"}']),
    "regla-norefine": ("ReGLA without the refining gate", ["--model", '{"use_refining_gate": false}']),
    "regla-tau16": ("ReGLA, gate normalizer tau 16", ["--model", '{"gate_logit_normalizer": 16}']),
}
LENGTHS = (512, 2048, 8192)


def layers_of(preset):
    from regla_torch.train import PRESETS
    return PRESETS[preset]["num_hidden_layers"]


def train_cmd(name, a):
    n = layers_of(a.preset)
    which = {"ALL": range(n), "ODD": range(1, n, 2)}
    flags = [",".join(map(str, which[f])) if f in which else f for f in RUNS[name][1]]
    d = Path(a.data)
    # `python -m regla.cli` is the `regla` command, also where the package is only on PYTHONPATH
    return [sys.executable, "-m", "regla.cli", "train", "--data", str(d / "train.bin"), "--val-data", str(d / "val.bin"),
            "--tokenizer", str(d / "tokenizer"), "--out", str(Path(a.out) / name), "--preset", a.preset,
            "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--max-steps", str(a.steps),
            "--lr", str(a.lr), "--warmup-steps", str(max(1, a.steps // 10)),
            "--eval-interval", str(max(1, a.steps // 10)), "--eval-batches", "16",
            "--save-interval", str(a.steps), "--export-dtype", "bf16", "--seed", "0", "--no-progress", *flags]


def cmd_train(a):
    names = a.only or list(RUNS)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in names:
        log = open(out / f"{name}.log", "w")
        script = (" ".join(map(_quote, train_cmd(name, a))) + f" && {_quote(sys.executable)} {_quote(__file__)} eval "
                  f"{_quote(str(out / name))} --data {_quote(a.data)}")
        log.write(script + "\n")
        log.flush()
        procs[name] = (subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT), log)
    t0 = time.time()
    failed = []
    for name, (p, log) in procs.items():
        if p.wait() != 0:
            failed.append(name)
        log.close()
    print(f"{len(names)} runs in {time.time() - t0:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _quote(s):
    import shlex
    return shlex.quote(str(s))


def cmd_eval(a):
    """Validation perplexity of RUN/final on the same first tokens of val.bin cut into windows of
    each length (8K: the first 10 * 8192 tokens, so every length sees the same tokens)."""
    import numpy as np
    import torch

    import regla_torch

    run = Path(a.run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = regla_torch.load(run / "final", device=device, dtype=torch.float32)
    val = np.fromfile(Path(a.data) / "val.bin", dtype=np.uint16).astype(np.int64)
    n = (len(val) // max(LENGTHS)) * max(LENGTHS)
    res = {}
    for L in LENGTHS:
        ids = torch.from_numpy(val[:n].reshape(-1, L))
        total, count = 0.0, 0
        for i in range(0, ids.shape[0], max(1, 16384 // L)):
            x = ids[i:i + max(1, 16384 // L)].to(device)
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            total += float(loss) * x[:, 1:].numel()
            count += x[:, 1:].numel()
        res[L] = math.exp(total / count)
    (run / "lengths.json").write_text(json.dumps({"tokens": n, "ppl": res}, indent=1))
    print(f"{run.name}: val perplexity " + ", ".join(f"{L}: {p:.2f}" for L, p in res.items()))


def cmd_report(a):
    out = Path(a.out)
    rows, curves = [], {}
    for name, (desc, _) in RUNS.items():
        log = out / name / "log.jsonl"
        if not log.exists():
            continue
        recs = [json.loads(x) for x in log.read_text().splitlines() if x]
        evals = [(r["step"], r["val_ppl"]) for r in recs if "val_ppl" in r]
        curves[name] = evals
        lens = json.loads((out / name / "lengths.json").read_text())["ppl"] if (out / name / "lengths.json").exists() else {}
        tps = sorted(r["tokens_per_s"] for r in recs[len(recs) // 5:])
        n_params = _params(out / name / "final")
        rows.append((name, desc, n_params, evals[-1][1] if evals else float("nan"),
                     [lens.get(str(L), float("nan")) for L in LENGTHS], tps[len(tps) // 2] if tps else 0))
    print("| run | what | params | val ppl (512, end of training) | ppl @512 | @2K | @8K | tok/s (shared GPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, desc, n_params, ppl, lens, tps in rows:
        print(f"| {name} | {desc} | {n_params / 1e6:.1f}M | {ppl:.2f} | " + " | ".join(f"{p:.2f}" for p in lens)
              + f" | {tps:,.0f} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return 0
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, ev in curves.items():
        if ev:
            ax.plot([s for s, _ in ev], [p for _, p in ev], marker="o", ms=3, label=name,
                    ls="--" if name in ("softmax", "gla") else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity (512 tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(a.title or "validation perplexity during training")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"plot: {out / 'curves.png'}")
    return 0


def _params(folder):
    """Parameter count from config.json (the weights need not be kept)."""
    from regla import checkpoint, spec
    return sum(math.prod(s) for s in spec.expected_shapes(checkpoint.read_args(folder)).values())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--out", default="runs/ablate")
    t.add_argument("--preset", default="40m")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--only", nargs="*", choices=list(RUNS))
    e = sub.add_parser("eval")
    e.add_argument("run")
    e.add_argument("--data", required=True)
    r = sub.add_parser("report")
    r.add_argument("out")
    r.add_argument("--title", default="")
    a = p.parse_args()
    return {"train": cmd_train, "eval": cmd_eval, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
