"""Experiment for #20's decode bar: a step's 97 projections as one persistent kernel whose weight
reads never wait on a data dependency, against the library's 97 launches. (Its successor, with
three dependencies a layer instead of five, is in the library: regla_torch.ops.triton.
persistent_step, measured by bench_persistent_step.py.)

Every boundary measured so far made a program's weight reads wait for the kernel (or the
programs) before it: the grid dependency wait, counters, a grid barrier. Here each program (one
an SM) streams its weight tiles through a ring of S tiles in shared memory (``cp.async``, S - 1
tiles ahead), in the order it will multiply them, across the products: while it waits for a
product's input (a count in global memory of the programs that finished the product before),
the next products' tiles are already in flight. Only the multiply waits on data. This is the
design of the single-kernel decoders the issue cites, reduced to its memory side: plain
products (no folds), each product's input the first K entries of the one before's output, the
shapes of bench_gemv.py's step (per layer in-proj 6160x2048, o 2048x2048, gate+up 11264x2048,
down 2048x5632; then the 32000-row head), every weight read once.

    python bench/bench_persistent_chain.py [--configs 12 13 28 ...] [--no-baselines] [--no-deal]
    python bench/bench_persistent_chain.py --folds [--fold-kinds 1 2 3] [--no-residuals] --configs 41
    python bench/bench_persistent_chain.py --folds --state --configs 41   # a whole GLA decode step

Two kernels: ``_chain_kernel``, where the same warps copy and multiply (a CTA barrier a tile),
and ``_chain_ws_kernel``, where PW warps of their own copy (``warp_specialize``) and per-slot
barriers hand the slots over (the copies' completion fills a slot, the multiplying warps' release
empties it). Written in Gluon (Triton's lower-level dialect: explicit shared memory and
cp.async); GPU only (Hopper), it does not run in Triton's interpreter. Each launch shape is
checked product by product (and with --state each recurrent step) against float64 references
from the kernel's own inputs (the folds and the step by regla.spec) before it is timed; a count
that never arrives (programs not all resident) ends its wait after a bounded number of polls and
is reported. The slot barriers have no such bound: run new shapes of the
second kernel under ``timeout``. ``WAIT=False`` shapes drop the data dependency (no count waited
on: the outputs are wrong, the time is the weight stream's alone).

H200, 2026-12-04 (BENCHMARKS section 1, twelfth session): with copying warps of their own
(``_chain_ws_kernel``, CONFIGS[38]: 16 x 1024 tiles, 6 slots, 4 copying and 4 multiplying warps)
**768 us against 864** for the library's 97 launches (581 for the same bytes in one launch); its
stream alone (CONFIGS[39]) 652 us, each product's dependency ~1.2 us. With one warp group doing
both (``_chain_kernel``): at its best (16 x 1024, 4-6 slots) 859-896 us against 859-873, no
faster; its stream alone 695-739 us (16 KB tiles 743-798: paced by the barriers), each
dependency ~1.6 us. That kernel's first version, reading each tile's slice of x from L2 beside
the tile, took 4,400 us; polling the count with volatile loads and then one acquire cost 20-25
us more than acquire polls.

``--folds`` (the second kernel only): the step's folds, in both the kernel and the library's
launches (``grouped_gemv`` as the decode step calls it). ``--state`` adds each layer's GLA
recurrent step (low-rank gate, state updated in place) as a stage between its in-proj and o,
and ``fused_recurrent_gated_step_`` to the library's launches: a whole decode step but the
embedding and the sampling.

H200, thirteenth session (BENCHMARKS section 1; raw bench/results/h200-2026-12-04-s13/): the
input step as one register tile loaded at once after the count (the twelfth session's loaded it a
K block after another, each waiting on its loads), the norms' sums of squares reduced by each
program from that tile (no atomics): CONFIGS[41] (8 multiplying warps) **849 us against 917** for
the library's 97 folded launches (the twelfth session's kernel: 1,053-1,120); plain products
CONFIGS[38] 733 against 880. **With --state, 957 us against 1,028** for the library's 121
launches: 7% off a step that needs 19% off (833 us) for #20's 1,200 tok/s. Each recurrent step
stage costs ~4.5 us (957 against 849), each product ~1-2 us over the stream alone. Dealing the row
blocks on across products (``--no-deal`` for the old order) gains 3-8 us.

``--trace`` says why: between the last program done with a stage and the others seeing its count
pass ~3-3.5 us, most of it that program's release add (2.3-3.4 us while the copies stream, 0.6 us
after a recurrent step, when the ring is full and nothing is in flight); the ring (6 tiles, ~6 us
of an SM's stream) hides that for a long product, not for the short ones in a row (state, o). Not
faster: L2 requests PF tiles ahead of the ring (kept, CONFIGS[46:52]; PF 2 to 8: 972 to 1,264 us
against 956), and, removed after they ran, two ways around the release add (4f55637):
each stage's outputs as 32-bit words (bf16 and a tag of the stage and launch) that the next stages
load until the tags match, no counts (1,097 us), or the same after relaxed counts (1,086 against
959); and the weight tiles copied by the TMA unit instead of cp.async (removed after 3b5e783 ran
it): 985 against 960 us, the release add as long, so the latency is the loaded memory system's,
not the SM's own copy queue. ``--split`` (each in-proj as two products, the recurrent step waiting
for the first only): 975 against 959 us; the step's stage shortens, the extra product costs more.
"""
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LAYERS = 24
STEP = [(6160, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]  # (N, K) of a layer's products
HEAD = (32000, 2048)


def _kernel():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from regla_torch.ops.triton.persistent_step import gluon_common
    async_load, barrier, _as_tile, _wait = gluon_common()

    @gluon.jit
    def _first(bo, pl, L, pid, P):
        """This program's first row block of product pl. Row blocks are dealt to the programs in
        turn across the products (product pl's first block to program bo[pl]), so the programs with
        a block more than the others in one product are not the same in the next (bo all 0: every
        product's first block to program 0)."""
        return (pid + P - gl.load(bo + gl.minimum(pl, L - 1))) % P

    @gluon.jit
    def _skip(pl, pb, ns, bo, L, P, pid, BN: gl.constexpr):
        """The first tile position at or after (pl, pb) where this program owns a row block."""
        while (pl < L) & (pb * BN >= gl.load(ns + gl.minimum(pl, L - 1))):
            pl += 1
            pb = _first(bo, pl, L, pid, P)
        return pl, pb

    @gluon.jit
    def _meta(pl, ks, woff, L):
        """Product pl's K and weight offset (read when the producer moves to a product, not a tile).
        // 8 * 8 (every K and offset is a multiple of 8) tells the compiler the rows start on 16
        bytes, which cp.async's 16-byte copies need."""
        q = gl.minimum(pl, L - 1)
        return gl.load(ks + q) // 8 * 8, gl.load(woff + q) // 8 * 8

    @gluon.jit
    def _issue(ring, slot, w, kq, wb, pl, pb, pk, rr, ck, L, BN: gl.constexpr, BK: gl.constexpr):
        """cp.async of tile (product pl, row block pb, K block pk) into ring slot; nothing past the last."""
        lim = gl.where(pl < L, BN, 0)
        cols = pk * BK + ck
        p = w + wb + (pb * BN + rr)[:, None].to(gl.int64) * kq + cols[None, :]
        # past K (a K block wider than K's remainder) the copy writes zeros, as x has there
        async_load(ring.index(slot), p, (rr < lim)[:, None] & (cols < kq)[None, :])

    @gluon.jit
    def _issue_next(ring, slot, w, ns, bo, ks, woff, kq, wb, pl, pb, pk, rr, ck, L, P, pid, BN: gl.constexpr,
                    BK: gl.constexpr):
        """Copy the producer's tile into ring slot (one commit group) and move the producer on."""
        gl.static_assert(BK % 8 == 0, "cp.async copies 16 bytes: K blocks of 8 bf16")
        _issue(ring, slot, w, kq, wb, pl, pb, pk, rr, ck, L, BN, BK)
        cp.commit_group()
        return _advance(pl, pb, pk, kq, wb, ns, bo, ks, woff, L, P, pid, BN, BK)

    @gluon.jit
    def _advance(pl, pb, pk, kq, wb, ns, bo, ks, woff, L, P, pid, BN, BK):  # BN, BK: constexprs
        """The producer's next tile: the next K block, else this program's next row block, else the
        next product where it owns one (its K and weight offset read then)."""
        pk += 1
        if pk * BK >= kq:
            pk = pk * 0
            pl2, pb = _skip(pl, pb + P, ns, bo, L, P, pid, BN)
            if pl2 != pl:
                kq, wb = _meta(pl2, ks, woff, L)
            pl = pl2
        return pl, pb, pk, kq, wb

    @gluon.jit
    def _stamp(tr, c, i, nst, TRACE: gl.constexpr):
        """--trace: this program's clock (%globaltimer, ns) as tr[pid, c, i] (i 0: stage c's count
        seen, 1: its work done, before the program adds to the next count)."""
        if TRACE:
            now = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                            pack=1)
            gl.store(tr + (gl.program_id(0) * nst + c) * 3 + i, now)

    @gluon.jit
    def _count_done(cnt, tr, c, nst, TRACE: gl.constexpr):
        """This program done with stage c: a release add to count c + 1 (after a barrier of the
        multiplying warps: every thread's stores before it). --trace: the clock once the add has
        returned (tr[pid, c, 2]; the read waits on the add's result)."""
        old = gl.atomic_add(cnt + c + 1, 1, sem="release", scope="gpu")
        if TRACE:
            now = gl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ge.s32 p, $1, 0; mov.u64 $0, 0; @p mov.u64 $0, %globaltimer; }", "=l,r",
                [old], dtype=gl.int64, is_pure=False, pack=1)
            gl.store(tr + (gl.program_id(0) * nst + c) * 3 + 2, now)

    @gluon.jit
    def _take_input(sx, xs, xo, k_l, cx, cnt, err, l, P, LIMIT, BK: gl.constexpr, NX: gl.constexpr,
                    WAIT: gl.constexpr):
        """Product l's input into shared memory: first (WAIT) every program done with product l - 1
        (``_wait``), then all of x's loads in flight at once."""
        if WAIT and l > 0:
            _wait(cnt, err, l, P, LIMIT)
        for i in gl.static_range(NX):
            sx.index(i).store(gl.load(xs + xo + i * BK + cx, mask=i * BK + cx < k_l, other=0.,
                                      cache_modifier=".cg").to(gl.float32))

    @gluon.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + gl.exp(-x))

    @gluon.jit
    def _entries(R: gl.constexpr, HEAD: gl.constexpr):
        """x's entries as an [R, HEAD] tile (a row a head of the o projection's input): 8 contiguous
        entries a thread (16-byte loads), two warps across a row so a row's sum stays in few warps."""
        LH: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps() // 2, 2], [1, 0])
        gl.static_assert(HEAD == 8 * 32 * 2, "a row is two warps' 8 entries a thread")
        return (gl.arange(0, R, layout=gl.SliceLayout(1, LH))[:, None] * HEAD
                + gl.arange(0, HEAD, layout=gl.SliceLayout(0, LH))[None, :])

    @gluon.jit
    def _fold_weight(nwb, no, fold, k_l, R: gl.constexpr, HEAD: gl.constexpr):
        """The norm weight a folded input takes, on ``_entries``' tile (ones where the fold has
        none): read before the count's wait, since it does not depend on the step."""
        e = _entries(R, HEAD)
        mk = e < k_l // 8 * 8
        idx = gl.where(fold == 2, e % HEAD, e)
        return gl.load(nwb + no // 8 * 8 + idx, mask=mk & ((fold == 1) | (fold == 2)), other=1.).to(gl.float32)

    @gluon.jit
    def _take_tile_input(sx, xs, xo, k_l, cnt, err, c, back, P, LIMIT, fold, go, b_nw, eps, tr, nst, R: gl.constexpr,
                         HEAD: gl.constexpr, WAIT: gl.constexpr, FOLDS: gl.constexpr, TRACE: gl.constexpr):
        """A product's input f(x) into shared memory, every load issued at once after count c - back
        (x, and the gate or up half, as one [R, HEAD] register tile), the norm weight b_nw
        (``_fold_weight``) already in registers, the norms' sums of squares reduced here from the
        tile (no other program adds them). Folds (``gemv.grouped_gemv``'s): 1 RMSNorm, its weight
        b_nw, the whole-row factor returned for the product's rows to take at the end (its sum
        reduced after the store); 2 each head's RMSNorm (a tile row a head), weight b_nw, times
        silu(gate), the gate at xs[go:]; 3 silu(x[:K]) * x[K:2K]; 0 x itself. Returns the factor
        (1 for folds other than 1)."""
        if WAIT and c - back > 0:
            _wait(cnt, err, c - back, P, LIMIT)
        e = _entries(R, HEAD)
        # every input starts on 16 bytes and every K is a multiple of 8: vector loads
        mk = e < k_l // 8 * 8
        xo = xo // 8 * 8
        b_x = gl.load(xs + xo + e, mask=mk, other=0., cache_modifier=".cg").to(gl.float32)
        r = eps * 0 + 1.0
        if FOLDS:
            o2 = gl.where(fold == 2, go // 8 * 8, xo + k_l // 8 * 8)  # the gate (2) or the up half (3)
            b_g = gl.load(xs + o2 + e, mask=mk & (fold >= 2), other=0., cache_modifier=".cg").to(gl.float32)
        _stamp(tr, c, 0, nst, TRACE)
        if FOLDS:
            b_f = b_x
            if fold == 1:
                b_f = b_x * b_nw
            if fold == 2:
                rh = gl.rsqrt(gl.sum(b_x * b_x, axis=1) / HEAD + eps)
                b_f = b_x * rh[:, None] * b_nw * (b_g * _sigmoid(b_g))
            if fold == 3:
                b_f = b_x * _sigmoid(b_x) * b_g
            _as_tile(sx, R, HEAD).store(b_f)
            if fold == 1:
                r = gl.rsqrt(gl.sum(gl.sum(b_x * b_x, axis=1), axis=0) / k_l + eps)
        else:
            _as_tile(sx, R, HEAD).store(b_x)
        return r

    @gluon.jit
    def _log_sigmoid(x):
        return gl.minimum(x, 0.) - gl.log(1. + gl.exp(-gl.abs(x)))

    @gluon.jit
    def _state_stage(xs, qo, ao, st, wf, bf, scale, inv_norm, cnt, err, c, P, LIMIT, tr, nst, H: gl.constexpr,
                     K: gl.constexpr, V: gl.constexpr, BV: gl.constexpr, R: gl.constexpr, WAIT: gl.constexpr,
                     TRACE: gl.constexpr, SPLIT: gl.constexpr):
        """A GLA layer's recurrent step (the library's ``fused_recurrent_gated_step_`` without the
        refining gate or key map): this program's [K, BV] tile of head h's state, the gate
        log_sigmoid(wf r + bf) * inv_norm of the low-rank factor r at xs[qo + 2HK + 2HV:], then
        S = exp(g) S + k v^T in place and o = (scale q) S into xs[ao:]. q, k, v, r are the
        in-proj's output at xs[qo:]. The state tile and the gate's weights are read before the
        count's wait (the state was written a step ago); one tile a program (H V / BV programs).
        Returns where the new state tile goes, the tile and whether this program has one: the caller
        stores it after its count (nothing in this step reads it). SPLIT: the in-proj is two
        products, this step's inputs (q, k, v, r) the first's output, waited for as count c - 1
        (the second, the output gate, is done by then or in flight)."""
        LS: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [gl.num_warps(), 1], [1, 0])
        gl.static_assert(BV == 16, "a [K, 16] tile: 4 lanes of 4 columns")
        gl.static_assert(R == 16, "the gate's rank read on the tile's columns")
        pid = gl.program_id(0)
        NB: gl.constexpr = V // BV
        has = pid < H * NB
        h = gl.minimum(pid, H * NB - 1) // NB
        j = gl.minimum(pid, H * NB - 1) % NB
        kk = gl.arange(0, K, layout=gl.SliceLayout(1, LS))
        vv = gl.arange(0, BV, layout=gl.SliceLayout(0, LS))
        ps = st + (h * K + kk)[:, None].to(gl.int64) * V + j * BV + vv[None, :]
        b_s = gl.load(ps, mask=has, other=0.)
        b_w = gl.load(wf + (h * K + kk)[:, None] * R + vv[None, :]).to(gl.float32)
        b_b = gl.load(bf + h * K + kk).to(gl.float32)
        qo = qo // 8 * 8
        if WAIT:
            _wait(cnt, err, c - (1 if SPLIT else 0), P, LIMIT)
        b_q = gl.load(xs + qo + h * K + kk, cache_modifier=".cg").to(gl.float32)
        b_k = gl.load(xs + qo + H * K + h * K + kk, cache_modifier=".cg").to(gl.float32)
        b_v = gl.load(xs + qo + 2 * H * K + h * V + j * BV + vv, cache_modifier=".cg").to(gl.float32)
        b_r = gl.load(xs + qo + 2 * H * K + (1 if SPLIT else 2) * H * V + vv, cache_modifier=".cg").to(gl.float32)
        _stamp(tr, c, 0, nst, TRACE)
        b_g = _log_sigmoid(gl.sum(b_w * b_r[None, :], axis=1) + b_b) * inv_norm
        b_s = gl.exp(b_g)[:, None] * b_s + b_k[:, None] * b_v[None, :]
        b_o = gl.sum((b_q * scale)[:, None] * b_s, axis=0)
        gl.store(xs + ao + h * V + j * BV + vv, b_o.to(xs.dtype.element_ty), mask=has)
        return ps, b_s, has

    @gluon.jit
    def _chain_kernel(w, xs, ns, bo, ks, woff, xoff, cnt, err, L, P, LIMIT, BN: gl.constexpr, BK: gl.constexpr,
                      S: gl.constexpr, NX: gl.constexpr, WAIT: gl.constexpr):
        LT: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
        pid = gl.program_id(0)
        ring = gl.allocate_shared_memory(w.dtype.element_ty, [S, BN, BK], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        # a product's whole input, read from L2 once a product (NX K blocks at most)
        sx = gl.allocate_shared_memory(gl.float32, [NX, BK], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        LX: gl.constexpr = gl.BlockedLayout([4], [32], [gl.num_warps()], [0])
        cx = gl.arange(0, BK, layout=LX)
        rr = gl.arange(0, BN, layout=gl.SliceLayout(1, LT))
        ck = gl.arange(0, BK, layout=gl.SliceLayout(0, LT))
        # the producer's position: the next tile to copy (product, row block, K block)
        pl, pb = _skip(pid * 0, _first(bo, 0, L, pid, P), ns, bo, L, P, pid, BN)
        pk = pid * 0
        kq, wb = _meta(pl, ks, woff, L)
        for i in gl.static_range(S - 1):
            pl, pb, pk, kq, wb = _issue_next(ring, i, w, ns, bo, ks, woff, kq, wb, pl, pb, pk, rr, ck, L, P, pid, BN,
                                             BK)
        t = pid * 0  # tiles consumed
        for l in range(L):
            n_l = gl.load(ns + l)
            k_l = gl.load(ks + l)
            xo = gl.load(xoff + l)
            yo = gl.load(xoff + l + 1)
            bo_l = gl.load(bo + l)  # (this program's first row block computed after the wait, not here)
            _take_input(sx, xs, xo, k_l, cx, cnt, err, l, P, LIMIT, BK, NX, WAIT)
            barrier()
            for b in range((pid + P - bo_l) % P, gl.cdiv(n_l, BN), P):  # ``_first``
                acc = gl.zeros([BN, BK], gl.float32, LT)
                for kt in range(0, gl.cdiv(k_l, BK)):
                    cp.wait_group(S - 2)  # this thread's copies of tile t landed
                    # every thread's copies of tile t landed, and every thread is done with tile
                    # t - 1, whose slot the next copy overwrites
                    barrier()
                    pl, pb, pk, kq, wb = _issue_next(ring, (t + S - 1) % S, w, ns, bo, ks, woff, kq, wb, pl, pb, pk,
                                                     rr, ck, L, P, pid, BN, BK)
                    b_w = ring.index(t % S).load(LT).to(gl.float32)
                    acc += b_w * sx.index(kt).load(gl.SliceLayout(0, LT))[None, :]
                    t += 1
                gl.store(xs + yo + b * BN + rr, gl.sum(acc, axis=1).to(xs.dtype.element_ty))
            barrier()  # every thread's stores before the count; and sx free for the next product
            gl.atomic_add(cnt + l + 1, 1, sem="release", scope="gpu")
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    @gluon.jit
    def _ws_producer(ring, full, empty, w, ns, bo, ks, woff, L, P, BN: gl.constexpr, BK: gl.constexpr,
                     S: gl.constexpr, PF: gl.constexpr):
        """The copying warps: every tile of this program's stream into the ring, a slot as soon as
        the multiplying warps release it, each slot's barrier signalled by the copies' completion.
        PF > 0: each tile also asked of L2 (``prefetch.global.L2``, a 128-byte line a request) PF
        tiles before its copy, before the wait for a free slot: while the multiplying warps wait on
        a count and the ring is full, memory keeps fetching up to PF tiles more."""
        LP: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
        pid = gl.program_id(0)
        rr = gl.arange(0, BN, layout=gl.SliceLayout(1, LP))
        ck = gl.arange(0, BK, layout=gl.SliceLayout(0, LP))
        pl, pb = _skip(pid * 0, _first(bo, 0, L, pid, P), ns, bo, L, P, pid, BN)
        pk = pid * 0
        kq, wb = _meta(pl, ks, woff, L)
        if PF > 0:  # the prefetch cursor, PF tiles ahead of the copies (their first PF tiles not asked)
            LQ: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [gl.num_warps(), 1], [1, 0])
            gl.static_assert(BK % 64 == 0, "a tile row in 128-byte lines")
            qr = gl.arange(0, BN, layout=gl.SliceLayout(1, LQ))
            qc = gl.arange(0, BK // 64, layout=gl.SliceLayout(0, LQ)) * 64
            ql, qb, qk, qkq, qwb = pl, pb, pk, kq, wb
            for _ in gl.static_range(PF):
                ql, qb, qk, qkq, qwb = _advance(ql, qb, qk, qkq, qwb, ns, bo, ks, woff, L, P, pid, BN, BK)
        t = pid * 0
        while pl < L:
            slot = t % S
            if PF > 0:
                if ql < L:
                    cols = qk * BK + qc
                    ok = ((qb * BN + qr) < gl.load(ns + ql))[:, None] & (cols < qkq)[None, :]
                    q = w + qwb + (qb * BN + qr)[:, None].to(gl.int64) * qkq + cols[None, :]
                    gl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                              [gl.where(ok, q, w)], dtype=gl.int32, is_pure=False, pack=1)
                ql, qb, qk, qkq, qwb = _advance(ql, qb, qk, qkq, qwb, ns, bo, ks, woff, L, P, pid, BN, BK)
            mbarrier.wait(empty.index(slot), ((t // S) & 1) ^ 1)  # the first round passes
            _issue(ring, slot, w, kq, wb, pl, pb, pk, rr, ck, L, BN, BK)
            cp.mbarrier_arrive(full.index(slot), increment_count=False)  # each thread, when its copies land
            pl, pb, pk, kq, wb = _advance(pl, pb, pk, kq, wb, ns, bo, ks, woff, L, P, pid, BN, BK)
            t += 1

    @gluon.jit
    def _ws_consumer(ring, full, empty, sx, xs, ns, bo, ks, xoff, cnt, err, L, P, LIMIT, xin, folds, goff, roff, nwoff,
                     nwb, eps, stl, stq, st, wf, bf, scale, inv_norm, tr, nst, BN: gl.constexpr,
                     BK: gl.constexpr, S: gl.constexpr, NX: gl.constexpr, WAIT: gl.constexpr, FOLDS: gl.constexpr,
                     HEAD: gl.constexpr, STATE: gl.constexpr, SH: gl.constexpr, SK: gl.constexpr,
                     TRACE: gl.constexpr, SPLIT: gl.constexpr):
        """The multiplying warps: per product, wait for its input (the count), x into shared memory,
        then each tile as its slot's barrier says it landed, the slot released after it is read.
        FOLDS: product l reads xs[xin[l]:] (not the product before's output) with folds[l]'s fold
        (``_take_tile_input``) and adds the residual xs[roff[l]:] where roff[l] >= 0. STATE: where
        stl[l] >= 0, layer stl[l]'s recurrent step (``_state_stage``, from the in-proj's output at
        xs[stq[l]:] into product l's input) comes before product l, a count of its own. SPLIT: five
        products a layer (``layer_kinds``); the second waits on the count the first waited on (its
        input is the first's, already complete)."""
        LT: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
        pid = gl.program_id(0)
        rr = gl.arange(0, BN, layout=gl.SliceLayout(1, LT))
        LW: gl.constexpr = SH * SK * HEAD  # a layer's state entries (HEAD: the value head size)
        t = pid * 0
        c = pid * 0  # the stage (product or state step) whose count this program adds to next
        for l in range(L):
            n_l = gl.load(ns + l)
            k_l = gl.load(ks + l)
            yo = gl.load(xoff + l + 1)
            bo_l = gl.load(bo + l)  # (this program's first row block computed after the wait, not here)
            fold = gl.load(folds + l) if FOLDS else 0
            xo = gl.load(xin + l) if FOLDS else gl.load(xoff + l)
            ro = gl.load(roff + l) if FOLDS else -1
            if STATE:
                sl = gl.load(stl + l)
                if sl >= 0:
                    ps, b_s, has = _state_stage(xs, gl.load(stq + l), xo, st + sl.to(gl.int64) * LW,
                                                wf + sl * (SH * SK * 16), bf + sl * (SH * SK), scale, inv_norm, cnt,
                                                err, c, P, LIMIT, tr, nst, SH, SK, HEAD, 16, 16, WAIT, TRACE, SPLIT)
                    barrier()  # every thread's stores of o before the count
                    _stamp(tr, c, 1, nst, TRACE)
                    _count_done(cnt, tr, c, nst, TRACE)
                    gl.store(ps, b_s, mask=has)
                    c += 1
            b_nw = _fold_weight(nwb, gl.load(nwoff + l), fold, k_l, NX * BK // HEAD, HEAD)
            # SPLIT: a layer's second product (in-proj B) waits on the count the first waited on
            back = ((l % 5 == 1) & (l < L - 1)).to(gl.int32) if SPLIT else 0
            r = _take_tile_input(sx, xs, xo, k_l, cnt, err, c, back, P, LIMIT, fold, gl.load(goff + l), b_nw, eps, tr,
                                 nst, NX * BK // HEAD, HEAD, WAIT, FOLDS, TRACE)
            barrier()
            for b in range((pid + P - bo_l) % P, gl.cdiv(n_l, BN), P):  # ``_first``
                if FOLDS:  # the residual's load in flight during the tiles, not after them
                    b_res = gl.load(xs + gl.maximum(ro, 0) + b * BN + rr, mask=(rr < BN) & (ro >= 0), other=0.,
                                    cache_modifier=".cg").to(gl.float32)
                acc = gl.zeros([BN, BK], gl.float32, LT)
                for kt in range(0, gl.cdiv(k_l, BK)):
                    slot = t % S
                    mbarrier.wait(full.index(slot), (t // S) & 1)
                    b_w = ring.index(slot).load(LT).to(gl.float32)
                    mbarrier.arrive(empty.index(slot))
                    acc += b_w * sx.index(kt).load(gl.SliceLayout(0, LT))[None, :]
                    t += 1
                b_y = gl.sum(acc, axis=1)
                if FOLDS:
                    b_y = b_y * r + b_res
                gl.store(xs + yo + b * BN + rr, b_y.to(xs.dtype.element_ty))
            barrier()
            _stamp(tr, c, 1, nst, TRACE)
            _count_done(cnt, tr, c, nst, TRACE)
            c += 1

    @gluon.jit
    def _chain_ws_kernel(w, xs, ns, bo, ks, woff, xoff, cnt, err, L, P, LIMIT, xin, folds, goff, roff, nwoff, nwb, eps,
                         stl, stq, st, wf, bf, scale, inv_norm, tr, nst, BN: gl.constexpr, BK: gl.constexpr,
                         S: gl.constexpr, NX: gl.constexpr, WAIT: gl.constexpr, PW: gl.constexpr,
                         EMPTY_COUNT: gl.constexpr, FOLDS: gl.constexpr, HEAD: gl.constexpr, STATE: gl.constexpr,
                         SH: gl.constexpr, SK: gl.constexpr, TRACE: gl.constexpr = False, PF: gl.constexpr = 0,
                         SPLIT: gl.constexpr = False):
        """``_chain_kernel`` with the copies in their own warps (PW of them, ``warp_specialize``),
        ring slots handed over by per-slot barriers instead of a CTA barrier a tile."""
        ring = gl.allocate_shared_memory(w.dtype.element_ty, [S, BN, BK], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        # f(x), written as [NX BK / HEAD, HEAD] (``_take_tile_input``), read a K block at a time
        sx = gl.allocate_shared_memory(gl.float32, [NX, BK], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        full = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(full.index(i), count=32 * PW)  # one asynchronous arrival a copying thread
            mbarrier.init(empty.index(i), count=EMPTY_COUNT)
        barrier()
        gl.warp_specialize([(_ws_consumer, (ring, full, empty, sx, xs, ns, bo, ks, xoff, cnt, err, L, P, LIMIT, xin,
                                            folds, goff, roff, nwoff, nwb, eps, stl, stq, st, wf, bf, scale, inv_norm,
                                            tr, nst, BN, BK, S, NX, WAIT, FOLDS, HEAD, STATE, SH, SK, TRACE, SPLIT)),
                            (_ws_producer, (ring, full, empty, w, ns, bo, ks, woff, L, P, BN, BK, S, PF))], [PW], [48])

    return _chain_kernel, _chain_ws_kernel


def _cfg(BN, BK, S, warps, per_sm=1, wait=True, pw=0, pf=0):
    """A launch shape: rows and K of a tile, ring slots, (multiplying) warps, programs an SM, whether
    the data dependency is kept, copying warps (0: the same warps copy and multiply), and how many
    tiles ahead of its copy each tile is asked of L2 (copying warps only)."""
    return dict(BN=BN, BK=BK, S=S, num_warps=warps, per_sm=per_sm, WAIT=wait, PW=pw, PF=pf)


CONFIGS = [  # every shape the twelfth session ran (BENCHMARKS section 1), then the copying warps'
    _cfg(16, 512, 8, 4), _cfg(16, 512, 8, 4, wait=False), _cfg(16, 512, 4, 4), _cfg(16, 512, 6, 4),
    _cfg(16, 512, 12, 4), _cfg(8, 512, 12, 4), _cfg(8, 512, 12, 4, wait=False), _cfg(16, 256, 16, 4),
    _cfg(16, 512, 4, 4, 2), _cfg(16, 512, 4, 4, 2, False), _cfg(8, 512, 8, 4, 2), _cfg(8, 512, 4, 4, 3),
    _cfg(16, 1024, 4, 4), _cfg(16, 1024, 4, 4, wait=False), _cfg(16, 1024, 5, 8), _cfg(16, 1024, 5, 8, wait=False),
    _cfg(8, 1024, 8, 4), _cfg(8, 1024, 8, 4, wait=False), _cfg(8, 2048, 4, 4), _cfg(8, 2048, 4, 4, wait=False),
    _cfg(16, 2048, 2, 8), _cfg(16, 2048, 2, 8, wait=False), _cfg(4, 2048, 8, 4), _cfg(16, 1024, 6, 4),
    _cfg(16, 1024, 6, 4, wait=False), _cfg(16, 1024, 6, 8), _cfg(16, 1024, 6, 8, wait=False), _cfg(16, 1024, 5, 4),
    _cfg(16, 1024, 5, 4, pw=1), _cfg(16, 1024, 5, 4, wait=False, pw=1), _cfg(16, 1024, 5, 4, pw=4),
    _cfg(16, 1024, 5, 4, wait=False, pw=4), _cfg(16, 512, 10, 4, pw=1), _cfg(16, 512, 10, 4, wait=False, pw=1),
    _cfg(16, 512, 10, 4, pw=4), _cfg(16, 512, 10, 4, wait=False, pw=4),
    _cfg(16, 1024, 6, 4, pw=1), _cfg(16, 1024, 6, 4, pw=2), _cfg(16, 1024, 6, 4, pw=4),
    _cfg(16, 1024, 6, 4, wait=False, pw=4), _cfg(16, 1024, 5, 8, pw=4), _cfg(16, 1024, 6, 8, pw=4),
    _cfg(16, 1024, 6, 8, wait=False, pw=4), _cfg(16, 1024, 6, 8, pw=1), _cfg(8, 1024, 10, 4, pw=4),
    _cfg(8, 1024, 10, 4, pw=1),
    # thirteenth session: L2 requests ahead of the ring
    _cfg(16, 1024, 6, 8, pw=4, pf=2), _cfg(16, 1024, 6, 8, pw=4, pf=4), _cfg(16, 1024, 6, 8, pw=4, pf=6),
    _cfg(16, 1024, 6, 8, pw=4, pf=8), _cfg(16, 1024, 6, 4, pw=4, pf=4), _cfg(16, 1024, 6, 8, wait=False, pw=4, pf=4),
    _cfg(16, 1024, 6, 8, pw=2),
]


D_HEAD = 512  # the attention output's head size (the o projection's head-norm fold)
SH, SK, SR = 4, 256, 16  # --state: the GLA 1.3B shape's heads, key head size and gate rank (value heads: D_HEAD)
GATE_NORMALIZER = 16.


def _f64(t):
    """A torch tensor as float64 numpy, for regla.spec."""
    return t.detach().double().cpu().numpy()


def state_reference(xs, qo, s0, wf, bfb, split=False):
    """A GLA layer's recurrent step by regla.spec (float64: ``logsigmoid`` of the low-rank gate,
    ``recurrent_gla``) from the in-proj's output at xs[qo:] (q, k, v, the output gate, the gate's
    low-rank factor; split: without the output gate) and the state s0 [SH, SK, D_HEAD]:
    (o [SH * D_HEAD], the new state), float32 on xs's device."""
    from regla import spec
    x = _f64(xs[qo:qo + 2 * SH * SK + (1 if split else 2) * SH * D_HEAD + SR])
    q, k = x[:SH * SK].reshape(SH, SK), x[SH * SK:2 * SH * SK].reshape(SH, SK)
    v = x[2 * SH * SK:2 * SH * SK + SH * D_HEAD].reshape(SH, D_HEAD)
    g = spec.logsigmoid(spec.linear(x[-SR:], _f64(wf), _f64(bfb))).reshape(SH, SK) / GATE_NORMALIZER
    o, s = spec.recurrent_gla(q[None, None], k[None, None], v[None, None], g[None, None], SK ** -0.5, _f64(s0)[None])
    return (torch.from_numpy(o).flatten().float().to(xs.device), torch.from_numpy(s[0]).float().to(xs.device))


def layer_kinds(split):
    """A layer's products in order (split: the in-proj as q, k, v and the gate's factor, then the
    output gate, a product of its own)."""
    return ["in-proj A", "in-proj B", "o", "gate+up", "down"] if split else ["in-proj", "o", "gate+up", "down"]


def folded_chain(shapes, xoff, dev, aoff=None, split=False):
    """The folds of a decode step (bench_gemv.py's): per layer, in-proj of RMSNorm(h); o of the
    per-head RMSNorm of its output's first 2048 entries (or, given aoff, of layer j's recurrent
    step's output at xs[aoff[j]:]) times silu(its entries 4096:6144; split: the second in-proj's
    output), plus h; gate+up of RMSNorm(h'); down of silu(gate) * up, plus h'; then the head of
    RMSNorm(h''). Returns per product the input offset into xs, the fold code
    (``_take_tile_input``), the gate and residual offsets (-1: none) and the norm weight's offset
    into the norm weights returned last."""
    yout = [int(v) for v in xoff[1:]]
    xin, folds, goff, roff, nwoff, nws = [], [], [], [], [], []
    kinds = layer_kinds(split)

    def weight(n):
        nws.append(torch.rand(n, device=dev) + 0.5)
        return sum(w.numel() for w in nws[:-1])
    for p in range(len(shapes) - 1):
        kind, j = kinds[p % len(kinds)], p // len(kinds)
        if kind in ("in-proj", "in-proj A"):  # the residual stream, normed
            xin.append(0 if p == 0 else yout[p - 1])
            folds.append(1), goff.append(0), roff.append(-1), nwoff.append(weight(2048))
        elif kind == "in-proj B":  # the same input and norm
            xin.append(xin[p - 1])
            folds.append(1), goff.append(0), roff.append(-1), nwoff.append(nwoff[p - 1])
        elif kind == "o":  # the head norm and gate; the residual stream added
            first = p - (2 if split else 1)  # the layer's (first) in-proj
            xin.append(yout[first] if aoff is None else aoff[j])
            folds.append(2), goff.append(yout[p - 1] if split else yout[p - 1] + 4096), roff.append(xin[first])
            nwoff.append(weight(D_HEAD))
        elif kind == "gate+up":  # the residual stream, normed
            xin.append(yout[p - 1])
            folds.append(1), goff.append(0), roff.append(-1), nwoff.append(weight(2048))
        else:  # down: silu(gate) * up; the residual stream added
            xin.append(yout[p - 1])
            folds.append(3), goff.append(0), roff.append(yout[p - 2]), nwoff.append(0)
    xin.append(yout[-2])
    folds.append(1), goff.append(0), roff.append(-1), nwoff.append(weight(2048))
    i64 = dict(device=dev, dtype=torch.int64)
    return (torch.tensor(xin, **i64), torch.tensor(folds, device=dev, dtype=torch.int32), torch.tensor(goff, **i64),
            torch.tensor(roff, **i64), torch.tensor(nwoff, **i64), torch.cat(nws).to(torch.bfloat16))


def folded_reference(w, xs, p, k, n, meta, eps=1e-6):
    """Product p of the folded chain from the kernel's own inputs in xs: the fold by regla.spec
    (``rms_norm``, ``silu``; float64), the product and residual in float64 on xs's device; float32."""
    from regla import spec
    xin, fold, goff, roff, nwoff, nwb = (int(meta[i][p]) if i < 5 else meta[i] for i in range(6))
    x = _f64(xs[xin:xin + k])
    if fold == 1:
        f = spec.rms_norm(x, _f64(nwb[nwoff:nwoff + k]), eps)
    elif fold == 2:  # each D_HEAD-wide head normed, times silu(gate)
        f = (spec.rms_norm(x.reshape(-1, D_HEAD), _f64(nwb[nwoff:nwoff + D_HEAD]), eps).flatten()
             * spec.silu(_f64(xs[goff:goff + k])))
    elif fold == 3:
        f = spec.silu(x) * _f64(xs[xin + k:xin + 2 * k])
    else:
        f = x
    y = w.double() @ torch.from_numpy(f).to(w.device)
    if roff >= 0:
        y = y + xs[roff:roff + n].double()
    return y.float()


def trace_report(tr, kinds):
    """What --trace's clocks say, per kind of stage, averaged over the layers (us): how long a stage
    holds the critical path (from the last program done with the stage before to the last done with
    it); how long the last program done with the stage before took to add to the count (its release
    add, until the add returned), and how long after that last program's work a program sees the
    count (median and fastest over the programs); a program's work after the count (median over
    programs, and the last program's); how far the last program finishes behind the median one."""
    wake, done, added = (tr[..., i].double() / 1e3 for i in range(3))
    rows = {}
    for c in range(1, tr.shape[1]):
        lp = int(done[:, c - 1].argmax())
        last = done[lp, c - 1]
        work = done[:, c] - wake[:, c]
        rows.setdefault(kinds[c], []).append([
            float(done[:, c].max() - last), float(added[lp, c - 1] - last), float((wake[:, c] - last).median()),
            float((wake[:, c] - last).min()), float(work.median()), float(work[done[:, c].argmax()]),
            float(done[:, c].max() - done[:, c].median())])
    print(f"    trace: {float(done[:, -1].max() - wake[:, 0].min()):.0f} us from the first stage's start to the last's "
          "end; per stage kind (us, mean over the layers):", flush=True)
    print("    kind      stages  on the path  last's add  count seen (median, first)  work (median, last's)  "
          "last behind median", flush=True)
    for kind, r in rows.items():
        m = torch.tensor(r).mean(0).tolist()
        print(f"    {kind:9} {len(r):6}  {m[0]:11.2f}  {m[1]:10.2f}  {m[2]:14.2f} {m[3]:6.2f}  {m[4]:17.2f} "
              f"{m[5]:5.2f}  {m[6]:18.2f}", flush=True)


def main():
    import argparse

    from bench_gemv import graph_us

    from regla_torch.ops.triton import fused_recurrent_gated_step_, grouped_gemv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=int, nargs="+", help="indices into CONFIGS (default: all)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the library's launches and the one-launch bound")
    ap.add_argument("--folds", action="store_true",
                    help="the step's folds (norms, head norm and gate, silu * up, residuals) in both the library's "
                         "launches and the copying-warp kernel (shapes with PW > 0 only)")
    ap.add_argument("--fold-kinds", type=int, nargs="*", choices=[1, 2, 3],
                    help="with --folds, keep only these folds (1 norm, 2 head norm and gate, 3 silu(gate) * up; the "
                         "others' inputs taken as they are): which fold costs what")
    ap.add_argument("--no-residuals", action="store_true", help="with --folds, no residual adds")
    ap.add_argument("--state", action="store_true",
                    help="with --folds, each layer's recurrent step (GLA's: low-rank gate, the state updated in place) "
                         "between its in-proj and o, in the kernel (a stage of its own) and in the library's launches "
                         "(fused_recurrent_gated_step_): a whole decode step but the embedding and the sampling")
    ap.add_argument("--trace", action="store_true",
                    help="after timing a shape, launch it once more with each program's clock read at every stage "
                         "(count seen, work done, release add returned; the last makes each program wait for its "
                         "add) and print where a stage's time goes (copying-warp kernel)")
    ap.add_argument("--split", action="store_true",
                    help="with --state, each in-proj as two products: q, k, v and the gate's factor (what the "
                         "recurrent step reads), then the output gate, which the programs compute while that step's "
                         "count travels (the step waits for the first product only)")
    ap.add_argument("--no-deal", action="store_true",
                    help="every product's row blocks dealt from program 0 (the twelfth session's order), not on "
                         "from where the product before ended")
    a = ap.parse_args()
    if a.state and not a.folds:
        ap.error("--state needs --folds (the o projection's input is the step's output, head-normed and gated)")
    if a.split and not a.state:
        ap.error("--split needs --state (it moves work between the in-proj and the recurrent step)")
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    step = STEP if not a.split else [(STEP[0][0] - 2048, 2048), (2048, 2048)] + STEP[1:]
    shapes = step * LAYERS + [HEAD]
    L = len(shapes)
    NP = len(step)  # products a layer
    ws = [torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5 for n, k in shapes]
    # the library's products: with --split, each layer's in-proj as one [q, k, v, output gate, factor]
    lib_ws = ws if not a.split else [w for j in range(LAYERS) for w in (
        torch.cat([ws[NP * j][:4096], ws[NP * j + 1], ws[NP * j][4096:]]), *ws[NP * j + 2:NP * j + 5])] + [ws[-1]]
    flat = torch.cat([w.flatten() for w in ws])
    woff = torch.tensor([0] + [n * k for n, k in shapes[:-1]], device=dev).cumsum(0)
    xoff = torch.tensor([0, 2048] + [n for n, _ in shapes[:-1]], device=dev).cumsum(0)
    ns = torch.tensor([n for n, _ in shapes], device=dev, dtype=torch.int32)
    ks = torch.tensor([k for _, k in shapes], device=dev, dtype=torch.int32)
    end = int(xoff[-1]) + shapes[-1][0]
    # --state: each layer's recurrent step writes its output after the products' outputs
    aoff = [end + SH * D_HEAD * j for j in range(LAYERS)] if a.state else None
    xs = torch.zeros(end + (SH * D_HEAD * LAYERS if a.state else 0), device=dev, dtype=bf)
    xs[:2048] = torch.randn(2048, device=dev, dtype=bf)
    nbytes = sum(n * k * 2 for n, k in shapes)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta = folded_chain(shapes, xoff, dev, aoff, a.split) if a.folds else None
    if a.state:  # fp32 states, read and written once a step; the gates' second low-rank factors
        st = torch.randn(LAYERS, SH, SK, D_HEAD, device=dev) * 0.1
        wf = (torch.randn(LAYERS, SH * SK, SR, device=dev) / SR ** 0.5).to(bf)
        bfb = torch.randn(LAYERS, SH * SK, device=dev).to(bf)
        st_lib = st.clone()
        o_at = NP - 3  # the o product's place in a layer; the recurrent step comes before it
        stl = torch.tensor([p // NP if p % NP == o_at and p < L - 1 else -1 for p in range(L)], device=dev,
                           dtype=torch.int32)
        stq = xoff[torch.arange(L, device=dev) - (1 if a.split else 0)].clone()  # at o: the (first) in-proj's output
        state_args = (stl, stq, st, wf, bfb, SK ** -0.5, 1 / GATE_NORMALIZER)
        nbytes += 2 * st.numel() * 4 + wf.numel() * 2
    else:
        state_args = (ns, xoff, xs.new_zeros(1, dtype=torch.float32), xs, xs, 1., 1.)
    nw = ([meta[5][o:o + (D_HEAD if f == 2 else 2048)] for o, f in zip(meta[4].tolist(), meta[1].tolist())]
          if a.folds else None)  # the library's norm weights, before any ablation
    if a.split:  # (in-proj B shares in-proj A's norm)
        nw = [w for p, w in enumerate(nw) if p == L - 1 or p % NP != 1]
    if a.folds and a.fold_kinds is not None:  # an ablation: the library's baseline keeps every fold
        keep = torch.tensor(a.fold_kinds, device=dev, dtype=torch.int32)
        meta = (meta[0], torch.where(torch.isin(meta[1], keep), meta[1], 0)) + meta[2:]
    if a.folds and a.no_residuals:
        meta = meta[:3] + (torch.full_like(meta[3], -1),) + meta[4:]
    print(f"{torch.cuda.get_device_name()} ({sms} SMs), torch {torch.__version__}, triton {triton.__version__}; "
          f"{L} {'folded' if a.folds else 'plain'} products{' and 24 recurrent steps' if a.state else ''}, "
          f"{nbytes / 1e9:.2f} GB", flush=True)

    x0 = xs[:2048].view(1, -1).clone()

    def library():
        x = x0
        for w in lib_ws:
            x = grouped_gemv(x[:, :w.shape[1]], [w])
        return x

    def library_folded():
        h = x0
        for j in range(LAYERS):
            p = 4 * j
            o1 = grouped_gemv(h, [lib_ws[p]], nw[p])
            att = o1[:, :2048]
            if a.state:
                qk = SH * SK
                att = fused_recurrent_gated_step_(
                    o1[:, :qk].view(1, SH, SK), o1[:, qk:2 * qk].view(1, SH, SK),
                    o1[:, 2 * qk:2 * qk + SH * D_HEAD].view(1, SH, D_HEAD), o1[:, -SR:], wf[j], bfb[j],
                    st_lib[j].unsqueeze(0), SK ** -0.5, GATE_NORMALIZER).view(1, -1)
            o2 = grouped_gemv(att, [lib_ws[p + 1]], nw[p + 1], residual=h, head_dim=D_HEAD, gate=o1[:, 4096:6144])
            o3 = grouped_gemv(o2, [lib_ws[p + 2]], nw[p + 2])
            h = grouped_gemv(o3, [lib_ws[p + 3]], glu=True, residual=o2)
        return grouped_gemv(h, [lib_ws[-1]], nw[-1])
    if not a.no_baselines:
        t = graph_us([library_folded if a.folds else library])
        print(f"library, {len(lib_ws) + (LAYERS if a.state else 0)} launches (PDL): {t:.0f} us "
              f"({nbytes / t / 1e3:.0f} GB/s)", flush=True)
        t = graph_us([lambda: grouped_gemv(x0, [flat.view(-1, 2048)])])
        print(f"the products' weights in one launch: {t:.0f} us ({flat.numel() * 2 / t / 1e3:.0f} GB/s)", flush=True)
    kernel, ws_kernel = _kernel()
    nst = L + (LAYERS if a.state else 0)  # stages: the products and the recurrent steps
    cnt = torch.zeros(nst + 1, device=dev, dtype=torch.int32)
    kinds = [k for _ in range(LAYERS) for k in layer_kinds(a.split)] + ["head"]
    if a.state:  # the recurrent step before each o
        kinds = [k for kind in kinds for k in (["state", kind] if kind == "o" else [kind])]
    err = torch.zeros(1, device=dev, dtype=torch.int32)
    fold_args = meta[:5] + (meta[5], 1e-6) if a.folds else (xoff, ns, xoff, xoff, xoff, xs, 1e-6)
    for index in a.configs if a.configs is not None else range(len(CONFIGS)):
        cfg = CONFIGS[index]
        BN, BK, S, warps, per_sm, wait, PW, PF = cfg.values()
        NX = triton.cdiv(5632, BK)
        if PW:  # one register tile of x: a power of two K blocks
            NX = triton.next_power_of_2(NX)
        if per_sm * (S * BN * BK * 2 + NX * BK * 4) > 227 * 1024:  # all programs resident, or the counts never arrive
            continue
        if a.folds and not (PW and wait):
            continue
        P = per_sm * sms
        # each product's first row block goes to the program after the one that took the product
        # before's last (--no-deal: every product starts at program 0)
        blocks = torch.tensor([0] + [triton.cdiv(n, BN) for n, _ in shapes[:-1]], device=dev).cumsum(0)
        bo = (blocks % P).to(torch.int32) if not a.no_deal else torch.zeros_like(ns)

        tr = torch.zeros(P, nst, 3, device=dev, dtype=torch.int64)

        def launch(trace=False):
            cnt.zero_()
            args = (flat, xs, ns, bo, ks, woff, xoff, cnt, err, L, P, 1 << 18)
            if PW:  # the slots' barriers: one asynchronous arrival a copying thread; one a release
                ws_kernel[(P,)](*args, *fold_args, *state_args, tr, nst, BN=BN, BK=BK, S=S, NX=NX, WAIT=wait,
                                PW=PW, EMPTY_COUNT=1, FOLDS=a.folds, HEAD=D_HEAD, STATE=a.state, SH=SH, SK=SK,
                                TRACE=trace, PF=PF, SPLIT=a.split, num_warps=warps)
            else:
                kernel[(P,)](*args, BN=BN, BK=BK, S=S, NX=NX, WAIT=wait, num_warps=warps)
        try:
            err.zero_()
            xs[2048:] = 0
            s0 = st.clone() if a.state else None
            launch()
            torch.cuda.synchronize()
            worst = 0.
            for j in range(LAYERS if a.state else 0):  # the recurrent steps: outputs and new states
                o, s1 = state_reference(xs, int(stq[NP * j + NP - 3]), s0[j], wf[j], bfb[j], a.split)
                y = xs[aoff[j]:aoff[j] + o.numel()].float()
                worst = max(worst, float((y - o.to(bf).float()).norm() / o.norm()),
                            float((st[j] - s1).norm() / s1.norm()))
            for i, (w, (n, k)) in enumerate(zip(ws, shapes)):
                y = xs[int(xoff[i + 1]):int(xoff[i + 1]) + n].float()
                if a.folds:
                    r = folded_reference(w, xs, i, k, n, meta).to(bf).float()
                else:
                    x = xs[int(xoff[i]):int(xoff[i]) + k].double()
                    r = (w.double() @ x).to(bf).float()
                worst = max(worst, float((y - r).norm() / r.norm()))
            if not wait:  # no data dependency kept: the outputs are not the products
                worst = float("nan")
            if int(err):
                print(f"  [{index}] {cfg}: a count never arrived (programs not all resident?)", flush=True)
                continue
            t = graph_us([launch])
        except Exception as e:  # noqa: BLE001 (a shape the compiler or the GPU refuses)
            print(f"  [{index}] {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(f"  [{index}] one persistent kernel {cfg}: {t:.0f} us ({nbytes / t / 1e3:.0f} GB/s), worst product's "
              f"rel err {worst:.1e}", flush=True)
        if a.trace and PW:
            launch(trace=True)
            torch.cuda.synchronize()
            trace_report(tr.cpu(), kinds)


if __name__ == "__main__":
    main()
