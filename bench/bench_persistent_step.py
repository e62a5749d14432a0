"""#20's decode bar: the library's persistent decode step (regla_torch.ops.triton.persistent_step:
a regla/gla model's whole batch-1 step as one Gluon kernel, three dependencies a layer) against
the library's per-layer launches, on the GLA 1.3B shape.

    python bench/bench_persistent_step.py [--configs 4 1] [--trace] [--no-baselines]
    python bench/bench_persistent_step.py --attn regla --configs 4 --trace

The GLA step runs from an embedding row to the logits on random bf16 weights, each launch shape
checked first against the same step in float64 (regla.spec's rms_norm, silu, logsigmoid,
recurrent_gla; logits and every layer's new state), then timed as a CUDA graph (with the memset
of its counts and accumulators); the library's baseline is the embedding, the 97 grouped GEMVs
and 24 gated step kernels under PDL. ``--attn regla`` times a random ReGLA 1.3B model's step
through ``generate.persistent_step`` (refining gate, safe-exp maps, running max), unchecked here:
tests/test_persistent_step.py checks that kernel against the float64 model. ``--trace`` reads
each program's clock at every stage (inputs seen, work done) and prints where a layer's time
goes. Gluon, Hopper only.

H200, 2026-12-04 (BENCHMARKS section 1, fourteenth session; bench/results/h200-2026-12-04-s14/):
GLA 812 us against 1,044 for the launches (CONFIGS[4]: 6 slots, 8 multiplying and 2 copying
warps, at most 2 tiles in flight; 845 with no cap, 885 with 1); ReGLA 867 us. The models through
the library's loop: 1,195 (gla) and 1,106 (regla) tok/s. Fifteenth session (stage B's gate on one
key channel a thread, its weights read a stage ahead; bench/results/h200-2026-12-04-s15/ call4,
the kernel before the committed poll fix): GLA 801 us, ReGLA 811; 1,216 and 1,196 tok/s.
"""
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LAYERS = 24
D, H, DK, DV, RANK, INNER, VOCAB = 2048, 4, 256, 512, 16, 5632, 32000  # the GLA 1.3B shape
GATE_NORMALIZER = 16.
# launch shapes: ring slots ([16, 1024] bf16 tiles), multiplying warps, copying warps, the most
# tiles in flight (0: as many as the ring has free slots)
CONFIGS = [dict(stages=6, warps=8, copy_warps=4, inflight=0), dict(stages=6, warps=8, copy_warps=2, inflight=0),
           dict(stages=6, warps=8, copy_warps=2, inflight=4), dict(stages=6, warps=8, copy_warps=2, inflight=3),
           dict(stages=6, warps=8, copy_warps=2, inflight=2), dict(stages=5, warps=8, copy_warps=2, inflight=0),
           dict(stages=6, warps=8, copy_warps=2, inflight=1), dict(stages=6, warps=8, copy_warps=4, inflight=2)]


def reference(x0, layers, wh, nwf, s0, eps=1e-6):
    """The step in float64 (regla.spec's rms_norm, silu, logsigmoid, recurrent_gla; the products
    in float64 on the GPU) from the embedding row x0: (logits, the new states)."""
    from regla import spec
    f64 = lambda t: t.detach().double()  # noqa: E731
    dev = x0.device
    np_ = lambda t: f64(t).cpu().numpy()  # noqa: E731
    back = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
    h, states = f64(x0), []
    for ly, s in zip(layers, s0):
        xn = back(spec.rms_norm(np_(h), np_(ly["attn_norm"]), eps))
        q, k, v, og = (f64(ly[n]) @ xn for n in ("q", "k", "v", "out_gate"))
        g = spec.logsigmoid(spec.linear((f64(ly["gate_f"]) @ xn).cpu().numpy(), np_(ly["gate_f2"]),
                                        np_(ly["gate_f_bias"]))).reshape(H, DK) / GATE_NORMALIZER
        o, s1 = spec.recurrent_gla(np_(q).reshape(1, 1, H, DK), np_(k).reshape(1, 1, H, DK),
                                   np_(v).reshape(1, 1, H, DV), g[None, None], DK ** -0.5, np_(s))
        states.append(back(s1))
        o = back(spec.rms_norm(o.reshape(H, DV), np_(ly["head_norm"]), eps)).flatten() * back(spec.silu(np_(og)))
        h = h + f64(ly["o"]) @ o
        xn = back(spec.rms_norm(np_(h), np_(ly["mlp_norm"]), eps))
        a = back(spec.silu(np_(f64(ly["mlp_gate"]) @ xn))) * (f64(ly["mlp_up"]) @ xn)
        h = h + f64(ly["mlp_down"]) @ a
    return f64(wh) @ back(spec.rms_norm(np_(h), np_(nwf), eps)), states


def trace_report(tr):
    """--trace's clocks per stage kind, mean over the layers (us): how long a stage holds the
    critical path (the last program done with the stage before to the last done with it); from
    that to a program seeing the count (median, first); a program's work after the count
    (median, the last program's)."""
    wake, done = (tr[..., i].double() / 1e3 for i in range(2))
    rows = {}
    for c in range(1, tr.shape[1]):
        kind = "head" if c == tr.shape[1] - 1 else "ABC"[c % 3]
        last = done[:, c - 1].max()
        work = done[:, c] - wake[:, c]
        rows.setdefault(kind, []).append([float(done[:, c].max() - last), float((wake[:, c] - last).median()),
                                          float((wake[:, c] - last).min()), float(work.median()),
                                          float(work[done[:, c].argmax()])])
    print(f"    trace: {float(done[:, -1].max() - wake[:, 0].min()):.0f} us first stage's start to the last's end; "
          "per stage kind (us, mean over the layers):", flush=True)
    print("    kind  stages  on the path  count seen (median, first)  work after it (median, last's)", flush=True)
    for kind, r in rows.items():
        m = torch.tensor(r).mean(0).tolist()
        print(f"    {kind:5} {len(r):6}  {m[0]:11.2f}  {m[1]:14.2f} {m[2]:6.2f}  {m[3]:16.2f} {m[4]:6.2f}", flush=True)


def main():
    import argparse

    from bench_gemv import graph_us

    from regla_torch.ops.triton import fused_recurrent_gated_step_, grouped_gemv
    from regla_torch.ops.triton.persistent_step import PersistentStep
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=int, nargs="+", help="indices into CONFIGS (default: all)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the library's launches")
    ap.add_argument("--trace", action="store_true", help="after timing a shape, one traced launch: where a stage's "
                                                          "time goes")
    ap.add_argument("--attn", default="gla", choices=["gla", "regla"],
                    help="regla: a random 1.3B ReGLA model's step (refining gate, safe-exp maps and running max) "
                         "through the library's persistent_step, timed and traced, not checked here "
                         "(tests/test_persistent_step.py checks it against the float64 model)")
    a = ap.parse_args()
    if a.attn == "regla":
        return regla_model(a)
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, device=dev) / s[-1] ** 0.5).to(bf)  # noqa: E731
    norm = lambda *s: (torch.rand(*s, device=dev) + 0.5).to(bf)  # noqa: E731
    layers = []
    for _ in range(LAYERS):
        win = rnd(6160, D)  # q, k, v, output gate, the gate's low-rank factor: the library's in-proj
        gu = rnd(2 * INNER, D)
        layers.append(dict(win=win, q=win[:H * DK], k=win[H * DK:2 * H * DK], v=win[2 * H * DK:2 * H * DK + H * DV],
                           out_gate=win[2 * H * DK + H * DV:-RANK], gate_f=win[-RANK:], gate_f2=rnd(H * DK, RANK),
                           gate_f_bias=torch.randn(H * DK, device=dev).to(bf), o=rnd(D, H * DV), head_norm=norm(DV),
                           attn_norm=norm(D), mlp_norm=norm(D), gu=gu, mlp_gate=gu[:INNER], mlp_up=gu[INNER:],
                           mlp_down=rnd(D, INNER)))
    emb, wh, nwf = rnd(VOCAB, D), rnd(VOCAB, D), norm(D)
    ids = torch.tensor([[5]], device=dev)
    states = [(torch.randn(1, H, DK, DV, device=dev) * 0.1, None) for _ in range(LAYERS)]
    nbytes = sum(ly[n].numel() * 2 for ly in layers for n in ("win", "o", "gu", "mlp_down")) + wh.numel() * 2
    nbytes += 2 * sum(s.numel() * 4 for s, _ in states)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} ({sms} SMs), torch {torch.__version__}, triton {triton.__version__}; "
          f"a GLA 1.3B decode step but the sampling, {nbytes / 1e9:.2f} GB", flush=True)

    if not a.no_baselines:
        st_lib = [s.clone() for s, _ in states]

        def library():
            h = emb[ids[0]]
            for ly, s in zip(layers, st_lib):
                y = grouped_gemv(h, [ly["win"]], ly["attn_norm"])
                qk = H * DK
                att = fused_recurrent_gated_step_(
                    y[:, :qk].view(1, H, DK), y[:, qk:2 * qk].view(1, H, DK), y[:, 2 * qk:2 * qk + H * DV].view(1, H, DV),
                    y[:, -RANK:], ly["gate_f2"], ly["gate_f_bias"], s, DK ** -0.5, GATE_NORMALIZER).view(1, -1)
                h = grouped_gemv(att, [ly["o"]], ly["head_norm"], residual=h, head_dim=DV,
                                 gate=y[:, 2 * qk + H * DV:-RANK])
                gu = grouped_gemv(h, [ly["gu"]], ly["mlp_norm"])
                h = grouped_gemv(gu, [ly["mlp_down"]], glu=True, residual=h)
            return grouped_gemv(h, [wh], nwf)
        t = graph_us([library])
        print(f"library, the embedding, {4 * LAYERS + 1} GEMV launches and {LAYERS} recurrent steps (PDL): {t:.0f} us "
              f"({nbytes / t / 1e3:.0f} GB/s)", flush=True)
        del st_lib

    math = dict(eps=1e-6, scale=DK ** -0.5, gate_logit_normalizer=GATE_NORMALIZER, clamp_min=None, safe_exp=False)
    step = PersistentStep(layers, emb, wh, nwf, H, math)
    P = step.programs
    tr = torch.zeros(P, 3 * LAYERS + 1, 2, device=dev, dtype=torch.int64)
    s0 = [s.clone() for s, _ in states]
    want, want_states = reference(emb[5].float(), layers, wh, nwf, s0)
    for index in a.configs if a.configs is not None else range(len(CONFIGS)):
        cfg = CONFIGS[index]
        vars(step).update(cfg)  # the launch shape: PersistentStep's attributes of these names
        try:
            step.err.zero_()
            for (s, _), s_ in zip(states, s0):
                s.copy_(s_)
            got = step(ids, states).double()
            torch.cuda.synchronize()
            worst = max([float((got[0] - want).norm() / want.norm())]
                        + [float((s.double() - w).norm() / w.norm()) for (s, _), w in zip(states, want_states)])
            if int(step.err):
                print(f"  [{index}] {cfg}: a count never arrived (programs not all resident?)", flush=True)
                continue
            t = graph_us([lambda: step(ids, states)])
        except Exception as e:  # noqa: BLE001 (a shape the compiler or the GPU refuses)
            print(f"  [{index}] {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(f"  [{index}] persistent step {cfg}: {t:.0f} us ({nbytes / t / 1e3:.0f} GB/s), logits' and states' "
              f"worst rel err against float64 {worst:.1e}", flush=True)
        if a.trace:
            step(ids, states, trace=tr)
            torch.cuda.synchronize()
            trace_report(tr.cpu())
            torch.save(tr.cpu(), os.path.join(os.environ.get("OUT", "."), f"trace_{index}.pt"))
    for (s, _), s_ in zip(states, s0):
        s.copy_(s_)


def regla_model(a):
    from bench_gemv import graph_us

    from regla import spec
    from regla_torch import ReGLAConfig, ReGLAForCausalLM
    from regla_torch.generate import persistent_step
    torch.manual_seed(0)
    args = spec.ModelArgs(attn_type="regla", vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_heads=H,
                          expand_k=0.5)
    with torch.device("cuda"):
        model = ReGLAForCausalLM(ReGLAConfig(**args.to_dict())).to(torch.bfloat16).eval()
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 16), device="cuda"), cache=cache, use_cache=True)
    step = persistent_step(model)
    states = [tuple(st) for st in cache.states]
    ids = torch.tensor([[5]], device="cuda")
    saved = [tuple(None if x is None else x.clone() for x in st) for st in states]
    tr = torch.zeros(step.programs, 3 * LAYERS + 1, 2, device="cuda", dtype=torch.int64)
    print(f"{torch.cuda.get_device_name()}, a random ReGLA 1.3B model's step through persistent_step", flush=True)
    for index in a.configs if a.configs is not None else range(len(CONFIGS)):
        cfg = CONFIGS[index]
        vars(step).update(cfg)  # the launch shape: PersistentStep's attributes of these names
        t = graph_us([lambda: step(ids, states)])
        print(f"  [{index}] persistent step {cfg}: {t:.0f} us", flush=True)
        if a.trace:
            step(ids, states, trace=tr)
            torch.cuda.synchronize()
            trace_report(tr.cpu())
        for st, keep in zip(states, saved):
            for x, y in zip(st, keep):
                if x is not None:
                    x.copy_(y)


if __name__ == "__main__":
    main()
