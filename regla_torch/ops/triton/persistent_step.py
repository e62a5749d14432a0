"""A regla/gla model's whole batch-1 decode step as one persistent kernel (Hopper, Gluon).

At batch 1 a step reads every weight once, and launching it as ~5 kernels a layer leaves ~3 us
at each boundary where the GPU reads nothing (BENCHMARKS section 1, decode: 121 launches of a
1.3B step take ~1,040 us against ~650 for its bytes). Here one program an SM streams its share
of every weight through a ring of shared-memory tiles (copying warps of their own, ``cp.async``),
in the order it multiplies them, across layers: only the multiplying warps ever wait for data.
A layer has three stages:

- **A**: q, k and the gates' low-rank first factors, their rows spread over all programs, each
  output stored as a 64-bit word tagged in its high half (one store each).
- **B**: program p < H * DV / 16 owns 16 value channels of one head. It first computes its own v
  rows (they need only the layer's input, so they overlap A), then reads its head's q, k and
  factors until every word carries its tag (the read that sees them brings them: no count, no
  release before it; every word read by one thread, so that all warps agree on the last read),
  then the gate (second factors, read during the layer before's MLP; refinement, clamp), the key
  and query maps with the running max (one key channel a thread), the state update of its
  [DK, 16] slice in place and its 16 outputs, all while its output-gate and W_o^T tiles stream
  in; then its output-gate rows, and the o projection split over its input: its 16 rows of
  W_o^T times the gated outputs, added with fp32 atomics into its head's accumulator. The
  per-head norm needs all DV outputs of a head, so each program adds its outputs' sum of squares
  to the head's and the next stage scales each head's accumulator: W_o (o_h r_h) = r_h (W_o o_h)
  for the head's r_h = rsqrt(mean(o_h^2) + eps). Ends with a count in global memory.
- **C**: after B's count, the MLP split over its inner units (~INNER / P a program): gate and
  up rows, then the same units' rows of W_down^T times silu(gate) * up, added into the layer's
  output accumulator. Ends with a count, which the next layer's A waits on.

then the head. The residual stream stays in fp32 in a workspace (program 0 writes it once a
stage); the counts, accumulators and tagged words are zeroed before each step (one memset). Each
count's release add is issued by a warp of its own, so the multiplying warps do not wait for
their stores to land. A read's answer queues behind the SM's reads in flight, so the copying
warps keep at most ``inflight`` tiles in flight (2 was fastest: 810 us a 1.3B GLA step, 845 with
no cap). Each program's weight rows are packed once, in the order it streams them
(``PersistentStep`` keeps that copy: the model's weights twice in memory).

Only Hopper (sm_90) runs it, and only on a real GPU: Gluon has no interpreter mode, so CI cannot
run this file's kernel. tests/test_persistent_step.py checks on any machine the packing and,
by a float64 emulation of the kernel's schedule over the packed weights, the decomposition
(stage order, deferred head norm, split MLP) against the model's own step; and on the GPU
machine the kernel (regla and gla models against the same model in float64).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

TILE = 1024  # a weight tile's columns (its rows: 16)


@functools.cache
def gluon_common():
    """What this kernel shares with bench_persistent_chain's: ``(async_load, barrier, as_2d,
    wait_count)``. The first two are Gluon calls Triton renamed after 3.6 (the device's), as the
    installed Triton names them; ``as_2d(sx, N0, N1)`` views a flat fp32 shared buffer as [N0,
    N1]; ``wait_count(cnt, err, c, P, LIMIT)`` polls count c until every program has added to
    it. Gluon is imported here, on first use, not with this module."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

    async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
    barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    if hasattr(gl.shared_memory_descriptor, "reinterpret"):
        @gluon.jit
        def as_2d(sx, N0: gl.constexpr, N1: gl.constexpr):
            return sx.reinterpret(gl.float32, [N0, N1], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    else:
        @gluon.jit
        def as_2d(sx, N0: gl.constexpr, N1: gl.constexpr):
            return sx._reinterpret(gl.float32, [N0, N1], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))

    @gluon.jit
    def wait_count(cnt, err, c, P, LIMIT):
        """Until every program has counted itself done with stage c: acquire polls (an add of 0
        compiles to ld.acquire.gpu; the last one orders this program's reads of the stage's
        outputs after it); err set if LIMIT polls did not see it (programs not all resident)."""
        seen = gl.atomic_add(cnt + c, 0, sem="acquire", scope="gpu")
        it = 0
        while (seen < P) & (it < LIMIT):
            seen = gl.atomic_add(cnt + c, 0, sem="acquire", scope="gpu")
            it += 1
        if seen < P:
            gl.store(err, 1)
    return async_load, barrier, as_2d, wait_count


@functools.cache
def _kernel():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    from .fused_recurrent import _log_gate, _safe_exp_maps
    async_load, barrier, _as_2d, _wait = gluon_common()

    @gluon.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + gl.exp(-x))

    @gluon.jit
    def _stamp(tr, c, i, NST, TRACE: gl.constexpr):
        """Benchmarks' trace: this program's %globaltimer (ns) as tr[pid, c, i] (0: stage c's
        count seen, 1: its work done)."""
        if TRACE:
            now = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                            pack=1)
            gl.store(tr + (gl.program_id(0) * NST + c) * 2 + i, now)

    @gluon.jit
    def _done(sig, c):
        """This program done with stage c: the multiplying warps' stores and atomics come before
        the arrival (its barrier of these warps); the signal warp's release add follows it."""
        mbarrier.arrive(sig.index(c % 2))

    @gluon.jit
    def _tile_index(NK: gl.constexpr, LA: gl.constexpr):
        return (gl.arange(0, NK, layout=gl.SliceLayout(1, LA))[:, None] * 1024
                + gl.arange(0, 1024, layout=gl.SliceLayout(0, LA))[None, :])

    @gluon.jit
    def _input(sx, x, hout, store_h, b_nw, eps, NK: gl.constexpr, LA: gl.constexpr):
        """A stage's input x (fp32, [NK, 1024] on ``_tile_index``'s layout) into shared memory as
        RMSNorm(x) * b_nw; where store_h, x itself stored at hout (the residual stream)."""
        e = _tile_index(NK, LA)
        gl.store(hout + e, x, mask=store_h & (e >= 0))
        r = gl.rsqrt(gl.sum(gl.sum(x * x, axis=1), axis=0) / (NK * 1024) + eps)
        _as_2d(sx, NK, 1024).store(x * r * b_nw)

    @gluon.jit
    def _rows(ring, full, empty, sx, t, S: gl.constexpr, NK: gl.constexpr, LT: gl.constexpr):
        """A row block (16 rows, NK tiles) times the input in sx: [16] on LT's rows. Each tile's
        products are summed over its columns at once, within a warp."""
        y = gl.zeros([16], gl.float32, gl.SliceLayout(1, LT))
        for kt in range(NK):  # not unrolled, as no tile loop here is: see _consumer
            slot = t % S
            mbarrier.wait(full.index(slot), (t // S) & 1)
            b_w = ring.index(slot).load(LT).to(gl.float32)
            mbarrier.arrive(empty.index(slot))
            y += gl.sum(b_w * sx.index(kt).load(gl.SliceLayout(0, LT))[None, :], axis=1)
            t += 1
        return y, t

    @gluon.jit
    def _cols(ring, full, empty, f, acc, t, S: gl.constexpr, NK: gl.constexpr, LR: gl.constexpr, LA: gl.constexpr):
        """A block of transposed rows (16 rows of W^T, NK tiles of its columns) times f [16] (on
        LR's rows: every thread holds all 16), added to acc [NK, 1024]: each thread sums its 16
        rows itself, no exchange between threads."""
        ki = gl.arange(0, NK, layout=gl.SliceLayout(1, LA))
        for kt in range(NK):
            slot = t % S
            mbarrier.wait(full.index(slot), (t // S) & 1)
            b_w = ring.index(slot).load(LR).to(gl.float32)
            mbarrier.arrive(empty.index(slot))
            part = gl.convert_layout(gl.sum(b_w * f[:, None], axis=0), gl.SliceLayout(0, LA))
            acc = gl.where((ki == kt)[:, None], acc + part[None, :], acc)
            t += 1
        return acc, t

    TAG = gl.constexpr(1 << 32)

    @gluon.jit
    def _max2(a, b, c, d):
        return gl.maximum(a, c), gl.maximum(b, d)

    @gluon.jit
    def _gate_weights(wf, bf, wr, br, pg, pb, mr, ok, REFINE: gl.constexpr):
        """A layer's second factors (as stored) and biases of the gates, rows pg / pb; nothing read
        where not ok (and the refining gate's only where REFINE)."""
        b_wf = gl.load(wf + pg, mask=ok & mr[None, :], other=0.)
        b_bf = gl.load(bf + pb, mask=ok & (pb >= 0), other=0.)
        b_wr = gl.load(wr + pg, mask=REFINE & ok & mr[None, :], other=0.)
        b_br = gl.load(br + pb, mask=REFINE & ok & (pb >= 0), other=0.)
        return b_wf, b_bf, b_wr, b_br

    @gluon.jit
    def _take_qkr(qkr, qb, hh, err, LIMIT, H: gl.constexpr, DK: gl.constexpr, R: gl.constexpr,
                  REFINE: gl.constexpr, LW: gl.constexpr):
        """Head hh's q and k and the gates' first factors, from A's tagged words (``qkr``), read
        again (volatile, from L2) until every one carries its tag: the read that sees them all
        brings them, with no count's release and acquire before it. Their values go to qb (rows
        q, k, f, r); err set if LIMIT reads did not (programs not all resident).

        Column c of LW's [4, threads] holds q[c], k[c], f[c], r[c] in one thread, every word in
        exactly one thread: the loop's test is then a reduction over all the warps, the same in
        each. (Words held by several warps, each warp's copy read at its own time, let warps
        disagree on leaving the loop, and a warp that leaves early meets the others' barriers
        out of step: the kernel hung.)"""
        gl.static_assert(DK <= 32 * gl.num_warps(), "a key channel a thread: DK at most 32 * num_warps")
        row = gl.arange(0, 4, layout=gl.SliceLayout(1, LW))[:, None]
        c = gl.arange(0, 32 * gl.num_warps(), layout=gl.SliceLayout(0, LW))[None, :]
        p = qkr + gl.where(row < 2, row * H * DK + hh * DK + c, 2 * H * DK + (row - 2) * R + c)
        m = gl.where(row < 2, c < DK, (c < R) & ((row == 2) | REFINE))
        w = gl.load(p, mask=m, other=TAG, volatile=True)
        it = 0
        while (gl.min(gl.min(w, axis=0), axis=0) < TAG) & (it < LIMIT):
            w = gl.load(p, mask=m, other=TAG, volatile=True)
            it += 1
        if it >= LIMIT:
            gl.store(err, 1)
        _as_2d(qb, 4, 32 * gl.num_warps()).store(w.to(gl.int32).to(gl.float32, bitcast=True))  # words' low halves

    @gluon.jit
    def _consumer(ring, full, empty, sig, sx, qb, ws, cnt, ids, emb, sptr, mptr, wf, bf, wr, br, nw1, nw2, nwo, nwf, a0,
                  na, rows, h0, err, tr, P, L, NB, LIMIT, eps, scale, inv_norm, clamp_min,
                  NK: gl.constexpr, H: gl.constexpr, DK: gl.constexpr, DV: gl.constexpr, R: gl.constexpr,
                  NSUB: gl.constexpr, REFINE: gl.constexpr, SAFE_EXP: gl.constexpr, CLAMP: gl.constexpr,
                  QKR: gl.constexpr, HMID: gl.constexpr, DW: gl.constexpr, ACCA: gl.constexpr,
                  ACCM: gl.constexpr, AW: gl.constexpr, NCOUNT: gl.constexpr, S: gl.constexpr,
                  TRACE: gl.constexpr):
        # Tile loops stay loops: unrolled, a layer's ~26 tiles made a ~9,000-instruction kernel
        # (ReGLA's; GLA's ~8,000) and ReGLA's step ran 40% slower than GLA's, every stage of the
        # layer loop slower and the head (outside it) not: the loop had outgrown the instruction
        # cache, and each miss is a read behind the weight stream.
        NW: gl.constexpr = gl.num_warps()
        D: gl.constexpr = NK * 1024
        LT: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NW, 1], [1, 0])  # [16, 1024]: a row's sum in a warp
        LR: gl.constexpr = gl.BlockedLayout([16, 4], [1, 32], [1, NW], [1, 0])  # [16, 1024]: a column in a thread
        LA: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, NW], [1, 0])  # [NK, 1024]: a D-vector
        LS: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [NW, 1], [1, 0])  # [DK, 16]: a state slice
        # [DK, R]: the gates' second factors, a key channel's row in a thread: the gate and maps
        # (ReGLA's refined gate: ~6 exact logs and exps) once a channel, then moved to the state's
        # rows (on LS a channel's row is spread over 4 threads: 4 times the math on B's path)
        LG: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [NW, 1], [1, 0])
        # [4, threads]: A's words as B polls them (``_take_qkr``), a word a thread: each poll one
        # read a thread (each thread holding all 2R factors was R reads, queued behind the stream)
        LW: gl.constexpr = gl.BlockedLayout([4, 1], [1, 32], [1, NW], [0, 1])
        SPH: gl.constexpr = DV // 16  # slices a head
        NST = 3 * L + 1
        pid = gl.program_id(0)
        is0 = pid == 0
        rt = gl.arange(0, 16, layout=gl.SliceLayout(1, LT))
        kk = gl.arange(0, DK, layout=gl.SliceLayout(1, LS))
        vv = gl.arange(0, 16, layout=gl.SliceLayout(0, LS))
        kg = gl.arange(0, DK, layout=gl.SliceLayout(1, LG))
        rg = gl.arange(0, 16, layout=gl.SliceLayout(0, LG))
        e = _tile_index(NK, LA)
        has = pid < H * SPH  # a stage-B slice: head hh, value channels jj * 16 ...
        hh = gl.minimum(pid, H * SPH - 1) // SPH
        jj = gl.minimum(pid, H * SPH - 1) % SPH
        my_a0 = gl.load(a0 + pid)
        my_na = gl.load(na + pid)
        t = pid * 0  # tiles consumed
        # the workspace (fp32): counts, then a layer's accumulators (sums of squares at 0, o, MLP)
        # a layer, then its data (the stream in at 0, A's outputs, the stream after attention)
        accs = ws + NCOUNT
        data = accs + L * AW
        m_new = eps * 0.
        m_cur = gl.load(mptr).to(gl.pointer_type(gl.float32), bitcast=True)  # the running max's layer
        pg = (hh * DK + kg)[:, None] * R + rg[None, :]
        b_wf, b_bf, b_wr, b_br = _gate_weights(wf, bf, wr, br, pg, hh * DK + kg, rg < R, True, REFINE)
        for j in range(L):
            lw = data + j * DW
            la = accs + j * AW
            # ---- A: q, k and the gates' first factors ----
            b_nw = gl.load(nw1 + j * D + e)
            # this layer's state and running max addresses, a stage before their loads need them
            # (a load's address waiting on a load would hold the warps a round trip)
            s_base = gl.load(sptr + j).to(gl.pointer_type(gl.float32), bitcast=True)
            m_next = gl.load(mptr + j).to(gl.pointer_type(gl.float32), bitcast=True)
            if j == 0:
                x = gl.load(emb + gl.load(ids).to(gl.int64) * D + e).to(gl.float32)
            else:
                _wait(cnt, err, 2 * j - 1, P, LIMIT)
                if SAFE_EXP:  # every program has read the old running max: the new one over it
                    gl.store(m_cur + hh, m_new, mask=has & (jj == 0))
                x = (gl.load(lw - DW + HMID + e, cache_modifier=".cg")
                     + gl.load(la - AW + ACCM + e, cache_modifier=".cg"))
            _stamp(tr, 3 * j, 0, NST, TRACE)
            _input(sx, x, lw, is0, b_nw, eps, NK, LA)
            barrier()
            y, t = _rows(ring, full, empty, sx, t, S, NK, LT)
            # each output a 64-bit word tagged 1 in its high half, one store: B reads them as they
            # land, no count (the region is zeroed before each step)
            qkr = (la + QKR).to(gl.pointer_type(gl.int64), bitcast=True)
            gl.store(qkr + my_a0 + rt, y.to(gl.uint32, bitcast=True).to(gl.int64) | TAG, mask=rt < my_na)
            _stamp(tr, 3 * j, 1, NST, TRACE)
            # ---- B: own v and output-gate rows, then the state slice and its o rows ----
            m_cur = m_next
            ps = s_base + (hh * DK + kk)[:, None] * DV + jj * 16 + vv[None, :]
            b_s = gl.load(ps, mask=has & (vv[None, :] >= 0), other=0.)
            if SAFE_EXP:
                m_prev = gl.load(m_cur + hh)
            b_no = gl.load(nwo + j * DV + jj * 16 + vv)
            yv, t = _rows(ring, full, empty, sx, t, S, NK, LT)
            b_v = gl.convert_layout(yv, gl.SliceLayout(0, LS))
            # A's outputs, the gate, maps and state before the output-gate rows: that math then
            # runs while the copying warps bring those rows' and W_o^T's tiles in
            _take_qkr(qkr, qb, hh, err, LIMIT, H, DK, R, REFINE, LW)
            barrier()
            b_q = qb.index(0).slice(0, DK).load(gl.SliceLayout(1, LG))
            b_k = qb.index(1).slice(0, DK).load(gl.SliceLayout(1, LG))
            b_rf = qb.index(2).slice(0, 16).load(gl.SliceLayout(0, LG))
            b_rr = qb.index(3).slice(0, 16).load(gl.SliceLayout(0, LG))
            _stamp(tr, 3 * j + 1, 0, NST, TRACE)
            # the forget gate and maps, as fused_recurrent._gated_step_kernel computes them
            z_f = gl.sum(b_wf.to(gl.float32) * b_rf[None, :], axis=1) + b_bf
            z_r = z_f
            if REFINE:
                z_r = gl.sum(b_wr.to(gl.float32) * b_rr[None, :], axis=1) + b_br
            b_g = _log_gate(z_f, z_r, inv_norm, clamp_min, REFINE, CLAMP)
            if SAFE_EXP:  # the maxima of q and k in one exchange
                q_max, k_max = gl.reduce((b_q, b_k), 0, _max2)
                b_q, b_k, b_g, m_new = _safe_exp_maps(b_q, b_k, b_g, q_max, k_max, m_prev)
            b_q = gl.convert_layout(b_q * scale, gl.SliceLayout(1, LS))
            b_k = gl.convert_layout(b_k, gl.SliceLayout(1, LS))
            b_a = gl.convert_layout(gl.exp(b_g), gl.SliceLayout(1, LS))
            b_s = b_a[:, None] * b_s + b_k[:, None] * b_v[None, :]
            b_o = gl.sum(b_q[:, None] * b_s, axis=0)
            gl.atomic_add(la + hh, gl.sum(b_o * b_o, axis=0), mask=has, sem="relaxed", scope="gpu")
            yg, t = _rows(ring, full, empty, sx, t, S, NK, LT)
            b_og = gl.convert_layout(yg, gl.SliceLayout(0, LS))
            f = gl.convert_layout(b_o * b_no * (b_og * _sigmoid(b_og)), gl.SliceLayout(1, LR))
            acc, t = _cols(ring, full, empty, f, gl.zeros([NK, 1024], gl.float32, LA), t, S, NK, LR, LA)
            gl.atomic_add(la + ACCA + hh * D + e, acc, mask=has & (e >= 0), sem="relaxed", scope="gpu")
            _stamp(tr, 3 * j + 1, 1, NST, TRACE)
            _done(sig, 2 * j)
            gl.store(ps, b_s, mask=has & (vv[None, :] >= 0))
            # the next layer's gate weights, read during this MLP (off B's path)
            b_wf, b_bf, b_wr, b_br = _gate_weights(wf, bf, wr, br, pg + (j + 1) * H * DK * R,
                                                   (j + 1) * H * DK + hh * DK + kg, rg < R, j + 1 < L, REFINE)
            # ---- C: the MLP, split over its inner units ----
            b_nw = gl.load(nw2 + j * D + e)
            _wait(cnt, err, 2 * j, P, LIMIT)
            _stamp(tr, 3 * j + 2, 0, NST, TRACE)
            x = gl.load(lw + e, cache_modifier=".cg")  # the residual stream A wrote
            for i in gl.static_range(H):
                r_h = gl.rsqrt(gl.load(la + i, cache_modifier=".cg") / DV + eps)
                x += r_h * gl.load(la + ACCA + i * D + e, cache_modifier=".cg")
            _input(sx, x, lw + HMID, is0, b_nw, eps, NK, LA)
            barrier()
            acc = gl.zeros([NK, 1024], gl.float32, LA)
            for s in range(NSUB):
                yg, t = _rows(ring, full, empty, sx, t, S, NK, LT)
                yu, t = _rows(ring, full, empty, sx, t, S, NK, LT)
                a = gl.convert_layout(yg * _sigmoid(yg) * yu, gl.SliceLayout(1, LR))
                acc, t = _cols(ring, full, empty, a, acc, t, S, NK, LR, LA)
            gl.atomic_add(la + ACCM + e, acc, sem="relaxed", scope="gpu")
            _stamp(tr, 3 * j + 2, 1, NST, TRACE)
            _done(sig, 2 * j + 1)
        # ---- the head ----
        b_nw = gl.load(nwf + e)
        _wait(cnt, err, 2 * L - 1, P, LIMIT)
        if SAFE_EXP:
            gl.store(m_cur + hh, m_new, mask=has & (jj == 0))
        _stamp(tr, 3 * L, 0, NST, TRACE)
        x = (gl.load(data + (L - 1) * DW + HMID + e, cache_modifier=".cg")
             + gl.load(accs + (L - 1) * AW + ACCM + e, cache_modifier=".cg"))
        hd = data + L * DW
        _input(sx, x, hd, is0, b_nw, eps, NK, LA)
        barrier()
        ho = gl.load(h0 + pid)
        for b in range(L * (4 + 3 * NSUB), NB):
            n = gl.load(rows + pid * NB + b)
            y, t = _rows(ring, full, empty, sx, t, S, NK, LT)
            gl.store(hd + D + ho + rt, y, mask=rt < n)
            ho += n
        _stamp(tr, 3 * L, 1, NST, TRACE)

    @gluon.jit
    def _producer(ring, full, empty, w, rows, start, NB, S: gl.constexpr, NK: gl.constexpr, IF: gl.constexpr):
        """The copying warps: this program's row blocks (one contiguous run of rows, rows[pid, b]
        of them a block) into the ring, NK [16, 1024] tiles a block, a slot as soon as the
        multiplying warps release it; rows past a block's count are zeros, not read. IF > 0: at
        most IF tiles in flight (a tile's copy waits for the one IF before it to land): a read's
        answer queues behind the SM's reads in flight, so fewer in flight answer the counts'
        polls sooner."""
        LP: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
        pid = gl.program_id(0)
        rr = gl.arange(0, 16, layout=gl.SliceLayout(1, LP))
        ck = gl.arange(0, 1024, layout=gl.SliceLayout(0, LP))
        off = gl.load(start + pid)
        t = pid * 0
        for b in range(NB):
            n = gl.load(rows + pid * NB + b)
            p = w + (off + rr)[:, None].to(gl.int64) * (NK * 1024) + ck[None, :]
            for kt in gl.static_range(NK):
                slot = t % S
                if IF > 0:
                    if t >= IF:
                        mbarrier.wait(full.index((t - IF) % S), ((t - IF) // S) & 1)
                mbarrier.wait(empty.index(slot), ((t // S) & 1) ^ 1)  # the first round passes
                async_load(ring.index(slot), p + kt * 1024, (rr < n)[:, None] & (ck >= 0)[None, :])
                cp.mbarrier_arrive(full.index(slot), increment_count=False)  # each thread, when its copies land
                t += 1
            off += n

    @gluon.jit
    def _signaller(sig, cnt, NC):
        """The signal warp: for each stage, once the multiplying warps arrive, this program's
        release add to the stage's count (its fence waits here, not in the multiplying warps)."""
        for c in range(NC):
            mbarrier.wait(sig.index(c % 2), (c // 2) & 1)
            gl.atomic_add(cnt + c, 1, sem="release", scope="gpu")

    @gluon.jit
    def step_kernel(w, rows, start, ws, cnt, ids, emb, sptr, mptr, wf, bf, wr, br, nw1, nw2, nwo, nwf, a0, na, h0, err,
                    tr, P, L, NB, LIMIT, eps, scale, inv_norm, clamp_min, NK: gl.constexpr, H: gl.constexpr,
                    DK: gl.constexpr, DV: gl.constexpr, R: gl.constexpr, NSUB: gl.constexpr, REFINE: gl.constexpr,
                    SAFE_EXP: gl.constexpr, CLAMP: gl.constexpr, QKR: gl.constexpr, HMID: gl.constexpr,
                    DW: gl.constexpr, ACCA: gl.constexpr, ACCM: gl.constexpr, AW: gl.constexpr,
                    NCOUNT: gl.constexpr, S: gl.constexpr, PW: gl.constexpr, TRACE: gl.constexpr,
                    IF: gl.constexpr = 0):
        ring = gl.allocate_shared_memory(w.dtype.element_ty, [S, 16, 1024], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        # the stage's input, written as one [NK, 1024] tile (``_as_2d``), read a tile's columns at a time
        sx = gl.allocate_shared_memory(gl.float32, [NK, 1024], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        # stage B's q, k and gate factors (``_take_qkr``), written as one tile, read a row at a time
        qb = gl.allocate_shared_memory(gl.float32, [4, 32 * gl.num_warps()], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        full = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        sig = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(full.index(i), count=32 * PW)  # one asynchronous arrival a copying thread
            mbarrier.init(empty.index(i), count=1)  # the multiplying warps' one arrival
        for i in gl.static_range(2):
            mbarrier.init(sig.index(i), count=1)
        barrier()
        gl.warp_specialize([(_consumer, (ring, full, empty, sig, sx, qb, ws, cnt, ids, emb, sptr, mptr, wf, bf, wr, br,
                                         nw1, nw2, nwo, nwf, a0, na, rows, h0, err, tr, P, L, NB, LIMIT, eps, scale,
                                         inv_norm, clamp_min, NK, H, DK, DV, R, NSUB, REFINE, SAFE_EXP, CLAMP, QKR,
                                         HMID, DW, ACCA, ACCM, AW, NCOUNT, S, TRACE)),
                            (_producer, (ring, full, empty, w, rows, start, NB, S, NK, IF)),
                            (_signaller, (sig, cnt, 2 * L))], [PW, 1], [48, 24])

    return step_kernel


def available(device) -> bool:
    """Whether this GPU and Triton can run the kernel: Hopper (sm_90) with Gluon's warp
    specialization."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    try:
        from triton.experimental.gluon import language as gl
        return hasattr(gl, "warp_specialize")
    except ImportError:
        return False


def _split(n, parts):
    """n items over parts as evenly as possible: (first, count) of each part."""
    counts = np.full(parts, n // parts) + (np.arange(parts) < n % parts)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), counts.astype(np.int64)


def _cdiv(a, b):
    return -(-a // b)


def _r16(n):
    return _cdiv(n, 16) * 16


class StepShape:
    """What the kernel's layout depends on: hidden size d (a multiple of 1024), heads h, head
    sizes dk, dv, the gates' rank r (at most 16; refine: a second low-rank gate), the MLP's
    inner size, the vocabulary, the layers and the programs (one an SM)."""

    def __init__(self, d, h, dk, dv, r, refine, inner, vocab, layers, programs):
        self.d, self.h, self.dk, self.dv, self.r, self.refine = d, h, dk, dv, r, refine
        self.inner, self.vocab, self.layers, self.programs = inner, vocab, layers, programs
        self.a_rows = 2 * h * dk + (2 if refine else 1) * r  # stage A: q, k, the gates' first factors
        self.slices = h * dv // 16
        self.nsub = _cdiv(_cdiv(inner, programs), 16)  # MLP blocks of 16 units a program
        self.head_blocks = _cdiv(_cdiv(vocab, programs), 16)
        self.blocks = layers * (4 + 3 * self.nsub) + self.head_blocks  # row blocks a program
        # the fp32 workspace (words): the counts, a layer's accumulators each (the heads' sums of
        # squares at 0, their o accumulators, the MLP's), zeroed before each step by one memset;
        # then a layer's data each (the residual stream in at 0, A's outputs, the stream after
        # attention); then the final stream and the logits
        self.ncount = _r16(2 * layers)  # a layer's counts: B's and C's
        self.acca, self.accm = _r16(h), _r16(h) + h * d
        self.qkr = self.accm + d  # A's outputs, tagged 64-bit words (two words each)
        self.aw = self.qkr + 2 * _r16(self.a_rows)
        self.hmid = d
        self.dw = self.hmid + d
        self.zeroed = self.ncount + layers * self.aw
        self.words = self.zeroed + layers * self.dw + d + vocab

    @staticmethod
    def of(layers, emb, head, heads, programs=None):
        """The shape of ``PersistentStep``'s weights (its arguments of those names) on this GPU's
        SMs (or ``programs``)."""
        l0 = layers[0]
        programs = programs or torch.cuda.get_device_properties(emb.device).multi_processor_count
        return StepShape(emb.shape[1], heads, l0["q"].shape[0] // heads, l0["v"].shape[0] // heads,
                         l0["gate_f"].shape[0], l0.get("gate_r") is not None, l0["mlp_gate"].shape[0], head.shape[0],
                         len(layers), programs)

    def problems(self):
        """Why the kernel cannot take this shape (empty: it can)."""
        p = self.programs
        out = []
        # the shapes it has run at (the kernel is written for more: any d a multiple of 1024,
        # dk a power of two from 64, ranks below 16 masked)
        if self.d not in (1024, 2048):
            out.append(f"hidden size {self.d} is not 1024 or 2048")
        if self.dk not in (128, 256):
            out.append(f"key head size {self.dk} is not 128 or 256")
        if self.dv % 16:
            out.append(f"value head size {self.dv} is not a multiple of 16")
        if self.r != 16:
            out.append(f"gate rank {self.r} is not 16")
        if self.slices > p or self.a_rows > 16 * p or self.nsub > 4:
            out.append(f"{p} SMs are too few for this model's step")
        return out

    def layout(self):
        """Each program's row blocks in stream order, as row indices into the sources
        ``PersistentStep`` concatenates (per layer: q, k, v, output gate, the gates' first
        factors, W_o^T, gate, up, W_down^T; then the head): (row indices, rows [P, NB] per block,
        start [P] of each program's run, A's first row and count [P], the head's first row [P])."""
        P, h, dk, dv = self.programs, self.h, self.dk, self.dv
        q, v, og = 0, 2 * h * dk, 2 * h * dk + h * dv  # (k at h * dk)
        fac = 2 * h * dk + 2 * h * dv  # the gates' first factors
        ot = fac + self.a_rows - 2 * h * dk
        gate = ot + h * dv
        up, down = gate + self.inner, gate + 2 * self.inner
        per_layer = down + self.inner
        a_src = np.concatenate([np.arange(q, v), fac + np.arange(self.a_rows - 2 * h * dk)])
        a0, na = _split(self.a_rows, P)
        u0, nu = _split(self.inner, P)
        h0, nh = _split(self.vocab, P)
        idx, rows, start = [], [], []
        n_rows = 0
        for p in range(P):
            start.append(n_rows)
            mine = []
            for j in range(self.layers):
                b = j * per_layer
                mine.append(b + a_src[a0[p]:a0[p] + na[p]])
                for off in (v, og, ot):  # this program's 16 value channels: v, output gate, W_o^T rows
                    mine.append(b + off + 16 * p + np.arange(16 if p < self.slices else 0))
                for s in range(self.nsub):
                    n = int(np.clip(nu[p] - 16 * s, 0, 16))
                    for off in (gate, up, down):
                        mine.append(b + off + u0[p] + 16 * s + np.arange(n))
            hb, hn = _split(int(nh[p]), self.head_blocks)
            for i in range(self.head_blocks):
                mine.append(self.layers * per_layer + h0[p] + hb[i] + np.arange(hn[i]))
            rows.append([len(m) for m in mine])
            idx.extend(mine)
            n_rows += sum(len(m) for m in mine)
        i32 = lambda x: torch.tensor(np.asarray(x), dtype=torch.int32)  # noqa: E731
        return (torch.from_numpy(np.concatenate(idx)), i32(rows), torch.tensor(start, dtype=torch.int64), i32(a0),
                i32(na), i32(h0))


class PersistentStep:
    """A model's decode step at batch 1 as ``_kernel()``'s one launch (plus the memset of its
    counts and accumulators): ``step(ids, states)`` -> logits [1, vocab] fp32, the states updated
    in place. Built once from the weights (packed in stream order: a second copy of them).

    ``layers``: per layer a dict of the weights as the model holds them: ``q``, ``k``, ``v``
    [h*dk or h*dv, d], ``gate_f``/``gate_r`` (the low-rank gates' first factors [r, d]; gate_r
    for ReGLA's refining gate, else absent), ``out_gate`` [h*dv, d], ``o`` [d, h*dv], ``mlp_gate``,
    ``mlp_up`` [inner, d], ``mlp_down`` [d, inner]; the small ones ``gate_f2``/``gate_r2`` [h*dk,
    r] with biases ``gate_f_bias``/``gate_r_bias`` [h*dk]; norms ``attn_norm``, ``mlp_norm`` [d],
    ``head_norm`` [dv] (or None). ``math``: eps, scale, gate_logit_normalizer, clamp_min (or
    None), safe_exp (the key map with a running max)."""

    def __init__(self, layers, emb, head, final_norm, heads, math, programs=None, stages=6, warps=8, copy_warps=2,
                 inflight=2):
        dev = emb.device
        self.shape = sh = StepShape.of(layers, emb, head, heads, programs)
        self.programs = sh.programs
        bad = sh.problems()
        if bad:
            raise ValueError("the persistent decode step cannot take this model: " + "; ".join(bad))
        if sh.dk > 32 * warps:  # stage B holds a key channel a thread
            raise ValueError(f"the persistent decode step needs warps >= {sh.dk // 32} for key heads of {sh.dk}")
        self.math, self.stages, self.warps, self.copy_warps, self.inflight = math, stages, warps, copy_warps, inflight
        idx, rows, start, a0, na, h0 = sh.layout()
        names = ["q", "k", "v", "out_gate", "gate_f"] + (["gate_r"] if sh.refine else [])
        parts = [t for ly in layers for t in [ly[n] for n in names] + [ly["o"].t(), ly["mlp_gate"], ly["mlp_up"],
                                                                        ly["mlp_down"].t()]]
        # the packed copy, filled a source at a time (no concatenated copy of the model on the way)
        where = torch.empty_like(idx)
        where[idx] = torch.arange(idx.numel())
        where = where.to(dev)
        self.w = torch.empty(idx.numel(), sh.d, device=dev, dtype=head.dtype)
        first = 0
        for t in parts + [head]:
            self.w[where[first:first + t.shape[0]]] = t
            first += t.shape[0]
        self.rows, self.start, self.a0, self.na, self.h0 = (x.to(dev) for x in (rows, start, a0, na, h0))
        f32 = lambda n: torch.stack([ly[n].float() for ly in layers]).contiguous()  # noqa: E731
        # the gates' second factors as the model holds them: every stage-B program of a head reads
        # its head's [dk, r] (in fp32, ReGLA's two were 32 KB a program a layer, beside 64 KB of
        # its v and output-gate rows)
        same = lambda n: torch.stack([ly[n] for ly in layers]).contiguous()  # noqa: E731
        self.wf, self.bf = same("gate_f2"), f32("gate_f_bias")
        self.wr, self.br = (same("gate_r2"), f32("gate_r_bias")) if sh.refine else (self.wf, self.bf)
        self.nw1, self.nw2 = f32("attn_norm"), f32("mlp_norm")
        self.nwo = torch.stack([ly["head_norm"].float() if ly["head_norm"] is not None
                                else torch.ones(sh.dv, device=dev) for ly in layers]).contiguous()
        self.nwf = final_norm.float().contiguous()
        self.emb = emb
        self.ws = torch.zeros(sh.words, device=dev)
        self.cnt = self.ws.view(torch.int32)
        self.err = torch.zeros(1, device=dev, dtype=torch.int32)
        self.trace = torch.zeros(1, device=dev, dtype=torch.int64)
        self._ptrs = None

    def check(self):
        """Raise if a step so far found a count that never arrived: the kernel needs every
        program resident at once (one an SM), and gave up waiting (its outputs are then wrong).
        Synchronizes with the GPU: for after warm-up steps, not every step."""
        if int(self.err):
            raise RuntimeError("the persistent decode step's programs were not all resident at once (another "
                               "process on the GPU's SMs?): its outputs are wrong; set REGLA_PERSISTENT=0 to decode "
                               "with the per-layer launches")

    def logits(self):
        sh = self.shape
        return self.ws[sh.words - sh.vocab:].view(1, -1)

    def launch_args(self, ids, states, trace=None):
        """The kernel's arguments for a step (positional, keyword), as ``__call__`` launches it."""
        sh, m = self.shape, self.math
        ptrs = [s[0].data_ptr() for s in states], [(s[1] if m["safe_exp"] else s[0]).data_ptr() for s in states]
        if self._ptrs is None or self._ptrs[0] != ptrs:  # the states' addresses, as the kernel reads them
            self._ptrs = ptrs, torch.tensor(ptrs[0], device=ids.device), torch.tensor(ptrs[1], device=ids.device)
        for s in states:
            if s[0].dtype != torch.float32 or not s[0].is_contiguous() or s[0].shape != (1, sh.h, sh.dk, sh.dv):
                raise ValueError(f"states must be contiguous float32 [1, {sh.h}, {sh.dk}, {sh.dv}]")
        args = (self.w, self.rows, self.start, self.ws, self.cnt, ids, self.emb, self._ptrs[1], self._ptrs[2], self.wf,
                self.bf, self.wr, self.br, self.nw1, self.nw2, self.nwo, self.nwf, self.a0, self.na, self.h0, self.err,
                self.trace if trace is None else trace, sh.programs, sh.layers, sh.blocks, 1 << 20, m["eps"],
                m["scale"], 1.0 / m["gate_logit_normalizer"], 0.0 if m["clamp_min"] is None else float(m["clamp_min"]))
        return args, dict(
            NK=sh.d // TILE, H=sh.h, DK=sh.dk, DV=sh.dv, R=sh.r, NSUB=sh.nsub, REFINE=sh.refine,
            SAFE_EXP=bool(m["safe_exp"]), CLAMP=m["clamp_min"] is not None, QKR=sh.qkr, HMID=sh.hmid, DW=sh.dw,
            ACCA=sh.acca, ACCM=sh.accm, AW=sh.aw, NCOUNT=sh.ncount, S=self.stages, PW=self.copy_warps,
            TRACE=trace is not None, IF=self.inflight, num_warps=self.warps)

    def __call__(self, ids, states, trace=None):
        """One step from the token ids [1, 1] (on the device) and the layers' states ``(S [1, h,
        dk, dv], m [1, h] or None, ...)`` fp32, updated in place; returns the logits [1, vocab]
        (fp32, a view of the workspace: the next step overwrites them)."""
        args, kw = self.launch_args(ids, states, trace)
        self.ws[:self.shape.zeroed].zero_()  # the counts and accumulators (the rest is overwritten)
        _kernel()[(self.programs,)](*args, **kw)
        return self.logits()
