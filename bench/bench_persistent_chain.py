"""Experiment for #20's decode bar: a step's 97 projections as one persistent kernel whose weight
reads never wait on a data dependency, against the library's 97 launches.

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

    python bench/bench_persistent_chain.py [--configs 12 13 28 ...] [--no-baselines]
    python bench/bench_persistent_chain.py --folds [--fold-kinds 1 2 3] [--no-residuals] --configs 41

Two kernels: ``_chain_kernel``, where the same warps copy and multiply (a CTA barrier a tile),
and ``_chain_ws_kernel``, where PW warps of their own copy (``warp_specialize``) and per-slot
barriers hand the slots over (the copies' completion fills a slot, the multiplying warps' release
empties it). Written in Gluon (Triton's lower-level dialect: explicit shared memory and
cp.async); GPU only (Hopper), it does not run in Triton's interpreter. Each launch shape is
checked product by product against float32 products of the kernel's own inputs before it is
timed; a count that never arrives (programs not all resident) ends its wait after a bounded
number of polls and is reported. The slot barriers have no such bound: run new shapes of the
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
launches (``grouped_gemv`` as the decode step calls it). H200: 1,053-1,120 us against 907-916, the
advantage gone; by ``--fold-kinds``/``--no-residuals`` ablation each fold costs 40-65 us a step
and the folded path's per-block sums of squares ~100 us (BENCHMARKS section 1).
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
    async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared  # renamed after 3.6
    barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed after 3.6

    @gluon.jit
    def _skip(pl, pb, ns, L, pid, BN: gl.constexpr):
        """The first tile position at or after (pl, pb) where this program owns a row block."""
        while (pl < L) & (pb * BN >= gl.load(ns + gl.minimum(pl, L - 1))):
            pl += 1
            pb = pid
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
    def _issue_next(ring, slot, w, ns, ks, woff, kq, wb, pl, pb, pk, rr, ck, L, P, pid, BN: gl.constexpr,
                    BK: gl.constexpr):
        """Copy the producer's tile into ring slot (one commit group) and move the producer on."""
        gl.static_assert(BK % 8 == 0, "cp.async copies 16 bytes: K blocks of 8 bf16")
        _issue(ring, slot, w, kq, wb, pl, pb, pk, rr, ck, L, BN, BK)
        cp.commit_group()
        return _advance(pl, pb, pk, kq, wb, ns, ks, woff, L, P, pid, BN, BK)

    @gluon.jit
    def _advance(pl, pb, pk, kq, wb, ns, ks, woff, L, P, pid, BN, BK):  # BN, BK: constexprs
        """The producer's next tile: the next K block, else this program's next row block, else the
        next product where it owns one (its K and weight offset read then)."""
        pk += 1
        if pk * BK >= kq:
            pk = pk * 0
            pl2, pb = _skip(pl, pb + P, ns, L, pid, BN)
            if pl2 != pl:
                kq, wb = _meta(pl2, ks, woff, L)
            pl = pl2
        return pl, pb, pk, kq, wb

    @gluon.jit
    def _wait_count(cnt, err, l, P, LIMIT):
        """Until every program is done with product l - 1: its count polled by acquire loads (an
        add of 0 compiles to ld.acquire.gpu; the last poll orders the reads of its output after
        the count); err set where LIMIT polls did not see it (programs not all resident)."""
        seen = gl.atomic_add(cnt + l, 0, sem="acquire", scope="gpu")
        it = 0
        while (seen < P) & (it < LIMIT):
            seen = gl.atomic_add(cnt + l, 0, sem="acquire", scope="gpu")
            it += 1
        if seen < P:
            gl.store(err, 1)

    @gluon.jit
    def _take_input(sx, xs, xo, k_l, cx, cnt, err, l, P, LIMIT, BK: gl.constexpr, NX: gl.constexpr,
                    WAIT: gl.constexpr):
        """Product l's input into shared memory: first (WAIT) every program done with product l - 1
        (``_wait_count``), then all of x's loads in flight at once."""
        if WAIT and l > 0:
            _wait_count(cnt, err, l, P, LIMIT)
        for i in gl.static_range(NX):
            sx.index(i).store(gl.load(xs + xo + i * BK + cx, mask=i * BK + cx < k_l, other=0.,
                                      cache_modifier=".cg").to(gl.float32))

    @gluon.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + gl.exp(-x))

    @gluon.jit
    def _take_folded_input(sx, xs, xo, k_l, cx, cnt, err, l, P, LIMIT, fold, go, nwb, no, eps, stats,
                           BK: gl.constexpr, NX: gl.constexpr, HEAD: gl.constexpr, WAIT: gl.constexpr):
        """``_take_input`` with the decode GEMV's folds (``gemv.grouped_gemv``): f(x) into shared
        memory, and the factor the product's rows take at the end (the whole-row norm's). fold 1:
        RMSNorm with weight nwb[no:]; 2: each HEAD-wide head's RMSNorm, its weight nwb[no:], times
        silu(gate), the gate at xs[go:]; 3: silu(x[:K]) * x[K:2K]; 0: x itself. The norms' sums of
        squares come from stats[4 l:4 l + 4], one per HEAD entries of x, which the programs that
        wrote x added there: no reduction here, only elementwise work after the wait."""
        if WAIT and l > 0:
            _wait_count(cnt, err, l, P, LIMIT)
        r = eps * 0 + 1.0
        if fold == 1:
            ss = gl.load(stats + 4 * l, cache_modifier=".cg") + gl.load(stats + 4 * l + 1, cache_modifier=".cg")
            ss += gl.load(stats + 4 * l + 2, cache_modifier=".cg") + gl.load(stats + 4 * l + 3, cache_modifier=".cg")
            r = gl.rsqrt(ss / k_l + eps)
        for i in gl.static_range(NX):
            e = i * BK + cx
            mk = e < k_l
            b_x = gl.load(xs + xo + e, mask=mk, other=0., cache_modifier=".cg").to(gl.float32)
            if fold == 1:
                b_x = b_x * gl.load(nwb + no + e, mask=mk, other=0.).to(gl.float32)
            if fold == 2:
                b_s = gl.load(stats + 4 * l + gl.minimum(e // HEAD, 3), cache_modifier=".cg")
                b_g = gl.load(xs + go + e, mask=mk, other=0., cache_modifier=".cg").to(gl.float32)
                b_x = b_x * gl.rsqrt(b_s / HEAD + eps) * gl.load(nwb + no + e % HEAD).to(gl.float32)
                b_x = b_x * b_g * _sigmoid(b_g)
            if fold == 3:
                b_u = gl.load(xs + xo + k_l + e, mask=mk, other=0., cache_modifier=".cg").to(gl.float32)
                b_x = b_x * _sigmoid(b_x) * b_u
            sx.index(i).store(b_x)
        return r

    if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # renamed after 3.6
        @gluon.jit
        def _as_tile(sx, NX: gl.constexpr, BK: gl.constexpr):
            return sx.reinterpret(gl.float32, [NX, BK], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    else:
        @gluon.jit
        def _as_tile(sx, NX: gl.constexpr, BK: gl.constexpr):
            return sx._reinterpret(gl.float32, [NX, BK], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))

    @gluon.jit
    def _fold_weight(nwb, no, fold, k_l, HEAD: gl.constexpr, NX: gl.constexpr, BK: gl.constexpr):
        """The norm weight a folded input takes, as a [NX, BK] tile of x's entries (ones where the
        fold has none): read before the count's wait, since it does not depend on the step."""
        L2: gl.constexpr = gl.BlockedLayout([1, BK // (32 * gl.num_warps())], [1, 32], [1, gl.num_warps()], [1, 0])
        e = (gl.arange(0, NX, layout=gl.SliceLayout(1, L2))[:, None] * BK
             + gl.arange(0, BK, layout=gl.SliceLayout(0, L2))[None, :])
        mk = e < k_l // 8 * 8
        idx = gl.where(fold == 2, e % HEAD, e)
        no = no // 8 * 8
        return gl.load(nwb + no + idx, mask=mk & ((fold == 1) | (fold == 2)), other=1.).to(gl.float32)

    @gluon.jit
    def _take_input_2d(sx, xs, xo, k_l, cnt, err, l, P, LIMIT, fold, go, b_nw, eps, stats, BK: gl.constexpr,
                       NX: gl.constexpr, HEAD: gl.constexpr, WAIT: gl.constexpr, FOLDS: gl.constexpr):
        """``_take_input``/``_take_folded_input`` with every load of the input issued at once after
        the wait (one [NX, BK] tile: x, the gate or up half, the head sums), not one K block after
        another, and the norm weight b_nw (``_fold_weight``) already in registers; the whole-row
        norm's factor from its four sums is computed after x is stored, off the path to the first
        multiply. Returns that factor (1 without a whole-row norm)."""
        L2: gl.constexpr = gl.BlockedLayout([1, BK // (32 * gl.num_warps())], [1, 32], [1, gl.num_warps()], [1, 0])
        if WAIT and l > 0:
            _wait_count(cnt, err, l, P, LIMIT)
        e = (gl.arange(0, NX, layout=gl.SliceLayout(1, L2))[:, None] * BK
             + gl.arange(0, BK, layout=gl.SliceLayout(0, L2))[None, :])
        # every input starts on 16 bytes and every K is a multiple of 8: vector loads
        mk = e < k_l // 8 * 8
        xo = xo // 8 * 8
        b_x = gl.load(xs + xo + e, mask=mk, other=0., cache_modifier=".cg").to(gl.float32)
        r = eps * 0 + 1.0
        if FOLDS:
            # the gate (fold 2) or up half (fold 3) beside x, and the head sums, in the same flight
            o2 = gl.where(fold == 2, go // 8 * 8, xo + k_l // 8 * 8)
            b_g = gl.load(xs + o2 + e, mask=mk & (fold >= 2), other=0., cache_modifier=".cg").to(gl.float32)
            s0 = gl.load(stats + 4 * l, cache_modifier=".cg")
            s1 = gl.load(stats + 4 * l + 1, cache_modifier=".cg")
            s2 = gl.load(stats + 4 * l + 2, cache_modifier=".cg")
            s3 = gl.load(stats + 4 * l + 3, cache_modifier=".cg")
            if fold == 1:
                b_x = b_x * b_nw
            if fold == 2:
                h = e // HEAD
                b_s = gl.where(h == 0, s0, gl.where(h == 1, s1, gl.where(h == 2, s2, s3)))
                b_x = b_x * gl.rsqrt(b_s / HEAD + eps) * b_nw * (b_g * _sigmoid(b_g))
            if fold == 3:
                b_x = b_x * _sigmoid(b_x) * b_g
        # the same unswizzled rows seen as one 2D tile (the multiplies read them a K block at a time)
        _as_tile(sx, NX, BK).store(b_x)
        if FOLDS:
            if fold == 1:
                r = gl.rsqrt((s0 + s1 + s2 + s3) / k_l + eps)
        return r

    @gluon.jit
    def _chain_kernel(w, xs, ns, ks, woff, xoff, cnt, err, L, P, LIMIT, BN: gl.constexpr, BK: gl.constexpr,
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
        pl, pb = _skip(pid * 0, pid, ns, L, pid, BN)
        pk = pid * 0
        kq, wb = _meta(pl, ks, woff, L)
        for i in gl.static_range(S - 1):
            pl, pb, pk, kq, wb = _issue_next(ring, i, w, ns, ks, woff, kq, wb, pl, pb, pk, rr, ck, L, P, pid, BN, BK)
        t = pid * 0  # tiles consumed
        for l in range(L):
            n_l = gl.load(ns + l)
            k_l = gl.load(ks + l)
            xo = gl.load(xoff + l)
            yo = gl.load(xoff + l + 1)
            _take_input(sx, xs, xo, k_l, cx, cnt, err, l, P, LIMIT, BK, NX, WAIT)
            barrier()
            for b in range(pid, gl.cdiv(n_l, BN), P):
                acc = gl.zeros([BN, BK], gl.float32, LT)
                for kt in range(0, gl.cdiv(k_l, BK)):
                    cp.wait_group(S - 2)  # this thread's copies of tile t landed
                    # every thread's copies of tile t landed, and every thread is done with tile
                    # t - 1, whose slot the next copy overwrites
                    barrier()
                    pl, pb, pk, kq, wb = _issue_next(ring, (t + S - 1) % S, w, ns, ks, woff, kq, wb, pl, pb, pk,
                                                     rr, ck, L, P, pid, BN, BK)
                    b_w = ring.index(t % S).load(LT).to(gl.float32)
                    acc += b_w * sx.index(kt).load(gl.SliceLayout(0, LT))[None, :]
                    t += 1
                gl.store(xs + yo + b * BN + rr, gl.sum(acc, axis=1).to(xs.dtype.element_ty))
            barrier()  # every thread's stores before the count; and sx free for the next product
            gl.atomic_add(cnt + l + 1, 1, sem="release", scope="gpu")
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    @gluon.jit
    def _ws_producer(ring, full, empty, w, ns, ks, woff, L, P, BN: gl.constexpr, BK: gl.constexpr,
                     S: gl.constexpr):
        """The copying warps: every tile of this program's stream into the ring, a slot as soon as
        the multiplying warps release it, each slot's barrier signalled by the copies' completion."""
        LP: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
        pid = gl.program_id(0)
        rr = gl.arange(0, BN, layout=gl.SliceLayout(1, LP))
        ck = gl.arange(0, BK, layout=gl.SliceLayout(0, LP))
        pl, pb = _skip(pid * 0, pid, ns, L, pid, BN)
        pk = pid * 0
        kq, wb = _meta(pl, ks, woff, L)
        t = pid * 0
        while pl < L:
            slot = t % S
            mbarrier.wait(empty.index(slot), ((t // S) & 1) ^ 1)  # the first round passes
            _issue(ring, slot, w, kq, wb, pl, pb, pk, rr, ck, L, BN, BK)
            cp.mbarrier_arrive(full.index(slot), increment_count=False)  # each thread, when its copies land
            pl, pb, pk, kq, wb = _advance(pl, pb, pk, kq, wb, ns, ks, woff, L, P, pid, BN, BK)
            t += 1

    @gluon.jit
    def _ws_consumer(ring, full, empty, sx, xs, ns, ks, xoff, cnt, err, L, P, LIMIT, xin, folds, goff, roff, nwoff,
                     nwb, eps, stats, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, NX: gl.constexpr,
                     WAIT: gl.constexpr, FOLDS: gl.constexpr, HEAD: gl.constexpr, X2D: gl.constexpr):
        """The multiplying warps: per product, wait for its input (the count), x into shared memory,
        then each tile as its slot's barrier says it landed, the slot released after it is read.
        FOLDS: product l reads xs[xin[l]:] (not the product before's output) with folds[l]'s fold,
        the residual xs[roff[l]:] added where roff[l] >= 0, and adds its outputs' sums of squares
        (the first 4 HEAD of them, a sum a HEAD) into stats[4 (l + 1):] for the next product's norms
        (every folded input is the output of the product before, 4 HEAD wide)."""
        LT: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
        LX: gl.constexpr = gl.BlockedLayout([4], [32], [gl.num_warps()], [0])
        pid = gl.program_id(0)
        cx = gl.arange(0, BK, layout=LX)
        rr = gl.arange(0, BN, layout=gl.SliceLayout(1, LT))
        t = pid * 0
        for l in range(L):
            n_l = gl.load(ns + l)
            k_l = gl.load(ks + l)
            yo = gl.load(xoff + l + 1)
            if X2D:
                fold = gl.load(folds + l) if FOLDS else 0
                xo = gl.load(xin + l) if FOLDS else gl.load(xoff + l)
                ro = gl.load(roff + l) if FOLDS else -1
                b_nw = _fold_weight(nwb, gl.load(nwoff + l), fold, k_l, HEAD, NX, BK)
                r = _take_input_2d(sx, xs, xo, k_l, cnt, err, l, P, LIMIT, fold, gl.load(goff + l), b_nw, eps, stats,
                                   BK, NX, HEAD, WAIT, FOLDS)
            elif FOLDS:
                xo = gl.load(xin + l)
                ro = gl.load(roff + l)
                r = _take_folded_input(sx, xs, xo, k_l, cx, cnt, err, l, P, LIMIT, gl.load(folds + l),
                                       gl.load(goff + l), nwb, gl.load(nwoff + l), eps, stats, BK, NX, HEAD, WAIT)
            else:
                xo = gl.load(xoff + l)
                _take_input(sx, xs, xo, k_l, cx, cnt, err, l, P, LIMIT, BK, NX, WAIT)
            barrier()
            for b in range(pid, gl.cdiv(n_l, BN), P):
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
                    b_y = (b_y * r + b_res).to(xs.dtype.element_ty)
                    if b * BN < 4 * HEAD:  # the next product's norms: this block's share of its head's sum
                        b_f = b_y.to(gl.float32)
                        if X2D:  # a relaxed add a row: no reduction across the warps, so no barrier
                            gl.atomic_add(stats + 4 * (l + 1) + gl.minimum((b * BN + rr) // HEAD, 3), b_f * b_f,
                                          mask=b * BN + rr < 4 * HEAD, sem="relaxed", scope="gpu")
                        else:
                            gl.atomic_add(stats + 4 * (l + 1) + (b * BN) // HEAD, gl.sum(b_f * b_f, axis=0))
                gl.store(xs + yo + b * BN + rr, b_y.to(xs.dtype.element_ty))
            barrier()
            gl.atomic_add(cnt + l + 1, 1, sem="release", scope="gpu")

    @gluon.jit
    def _chain_ws_kernel(w, xs, ns, ks, woff, xoff, cnt, err, L, P, LIMIT, xin, folds, goff, roff, nwoff, nwb, eps,
                         stats, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, NX: gl.constexpr, WAIT: gl.constexpr,
                         PW: gl.constexpr, EMPTY_COUNT: gl.constexpr, FOLDS: gl.constexpr, HEAD: gl.constexpr,
                         X2D: gl.constexpr = True):
        """``_chain_kernel`` with the copies in their own warps (PW of them, ``warp_specialize``),
        ring slots handed over by per-slot barriers instead of a CTA barrier a tile."""
        ring = gl.allocate_shared_memory(w.dtype.element_ty, [S, BN, BK], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        sx = gl.allocate_shared_memory(gl.float32, [NX, BK], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        full = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(full.index(i), count=32 * PW)  # one asynchronous arrival a copying thread
            mbarrier.init(empty.index(i), count=EMPTY_COUNT)
        barrier()
        gl.warp_specialize([(_ws_consumer, (ring, full, empty, sx, xs, ns, ks, xoff, cnt, err, L, P, LIMIT, xin, folds,
                                            goff, roff, nwoff, nwb, eps, stats, BN, BK, S, NX, WAIT, FOLDS,
                                            HEAD, X2D)),
                            (_ws_producer, (ring, full, empty, w, ns, ks, woff, L, P, BN, BK, S))], [PW], [48])

    return _chain_kernel, _chain_ws_kernel


def _cfg(BN, BK, S, warps, per_sm=1, wait=True, pw=0):
    """A launch shape: rows and K of a tile, ring slots, (multiplying) warps, programs an SM, whether
    the data dependency is kept, copying warps (0: the same warps copy and multiply)."""
    return dict(BN=BN, BK=BK, S=S, num_warps=warps, per_sm=per_sm, WAIT=wait, PW=pw)


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
]


D_HEAD = 512  # the attention output's head size (the o projection's head-norm fold)


def folded_chain(shapes, xoff, dev):
    """The folds of a decode step (bench_gemv.py's): per layer, in-proj of RMSNorm(h); o of the
    per-head RMSNorm of its output's first 2048 entries times silu(its entries 4096:6144), plus h;
    gate+up of RMSNorm(h'); down of silu(gate) * up, plus h'; then the head of RMSNorm(h''). Returns
    per product the input offset into xs, the fold code (``_take_folded_input``), the gate and
    residual offsets (-1: none) and the norm weight's offset into the norm weights returned last."""
    yout = [int(v) for v in xoff[1:]]
    xin, folds, goff, roff, nwoff, nws = [], [], [], [], [], []

    def weight(n):
        nws.append(torch.rand(n, device=dev) + 0.5)
        return sum(w.numel() for w in nws[:-1])
    for p in range(len(shapes) - 1):
        kind = p % 4
        if kind == 0:    # in-proj: the residual stream, normed
            xin.append(0 if p == 0 else yout[p - 1])
            folds.append(1), goff.append(0), roff.append(-1), nwoff.append(weight(2048))
        elif kind == 1:  # o: the head norm and gate; the residual stream added
            xin.append(yout[p - 1])
            folds.append(2), goff.append(yout[p - 1] + 4096), roff.append(xin[p - 1]), nwoff.append(weight(D_HEAD))
        elif kind == 2:  # gate + up: the residual stream, normed
            xin.append(yout[p - 1])
            folds.append(1), goff.append(0), roff.append(-1), nwoff.append(weight(2048))
        else:            # down: silu(gate) * up; the residual stream added
            xin.append(yout[p - 1])
            folds.append(3), goff.append(0), roff.append(yout[p - 2]), nwoff.append(0)
    xin.append(yout[-2])
    folds.append(1), goff.append(0), roff.append(-1), nwoff.append(weight(2048))
    i64 = dict(device=dev, dtype=torch.int64)
    return (torch.tensor(xin, **i64), torch.tensor(folds, device=dev, dtype=torch.int32), torch.tensor(goff, **i64),
            torch.tensor(roff, **i64), torch.tensor(nwoff, **i64), torch.cat(nws).to(torch.bfloat16))


def folded_reference(w, xs, p, k, n, meta, eps=1e-6):
    """Product p of the folded chain in float32 from the kernel's own inputs in xs."""
    xin, fold, goff, roff, nwoff, nwb = (int(meta[i][p]) if i < 5 else meta[i] for i in range(6))
    if fold == 0:
        f = xs[xin:xin + k].float()
    elif fold == 3:
        a, b = xs[xin:xin + k].float(), xs[xin + k:xin + 2 * k].float()
        f = torch.nn.functional.silu(a) * b
    else:
        x = xs[xin:xin + k].float()
        if fold == 1:
            f = x * nwb[nwoff:nwoff + k].float() * torch.rsqrt(x.pow(2).mean() + eps)
        else:
            h = x.view(-1, D_HEAD)
            g = xs[goff:goff + k].float()
            f = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * nwb[nwoff:nwoff + D_HEAD].float()).flatten()
            f = f * torch.nn.functional.silu(g)
    y = w.float() @ f
    if roff >= 0:
        y = y + xs[roff:roff + n].float()
    return y


def main():
    import argparse

    from bench_gemv import graph_us

    from regla_torch.ops.triton.gemv import grouped_gemv
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
    ap.add_argument("--x-per-block", action="store_true",
                    help="the copying-warp kernel's input step as in the twelfth session (x's loads one K block after "
                         "another, the norm weight read after the wait, a cross-warp sum of squares a block)")
    a = ap.parse_args()
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    shapes = STEP * LAYERS + [HEAD]
    L = len(shapes)
    ws = [torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5 for n, k in shapes]
    flat = torch.cat([w.flatten() for w in ws])
    woff = torch.tensor([0] + [n * k for n, k in shapes[:-1]], device=dev).cumsum(0)
    xoff = torch.tensor([0, 2048] + [n for n, _ in shapes[:-1]], device=dev).cumsum(0)
    ns = torch.tensor([n for n, _ in shapes], device=dev, dtype=torch.int32)
    ks = torch.tensor([k for _, k in shapes], device=dev, dtype=torch.int32)
    xs = torch.zeros(int(xoff[-1]) + shapes[-1][0], device=dev, dtype=bf)
    xs[:2048] = torch.randn(2048, device=dev, dtype=bf)
    nbytes = sum(n * k * 2 for n, k in shapes)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta = folded_chain(shapes, xoff, dev) if a.folds else None
    nw = ([meta[5][o:o + (D_HEAD if f == 2 else 2048)] for o, f in zip(meta[4].tolist(), meta[1].tolist())]
          if a.folds else None)  # the library's norm weights, before any ablation
    if a.folds and a.fold_kinds is not None:  # an ablation: the library's baseline keeps every fold
        keep = torch.tensor(a.fold_kinds, device=dev, dtype=torch.int32)
        meta = (meta[0], torch.where(torch.isin(meta[1], keep), meta[1], 0)) + meta[2:]
    if a.folds and a.no_residuals:
        meta = meta[:3] + (torch.full_like(meta[3], -1),) + meta[4:]
    print(f"{torch.cuda.get_device_name()} ({sms} SMs), torch {torch.__version__}, triton {triton.__version__}; "
          f"{L} {'folded' if a.folds else 'plain'} products, {nbytes / 1e9:.2f} GB", flush=True)

    x0 = xs[:2048].view(1, -1).clone()

    def library():
        x = x0
        for w in ws:
            x = grouped_gemv(x[:, :w.shape[1]], [w])
        return x


    def library_folded():
        h = x0
        for j in range(LAYERS):
            p = 4 * j
            o1 = grouped_gemv(h, [ws[p]], nw[p])
            o2 = grouped_gemv(o1[:, :2048], [ws[p + 1]], nw[p + 1], residual=h, head_dim=D_HEAD,
                              gate=o1[:, 4096:6144])
            o3 = grouped_gemv(o2, [ws[p + 2]], nw[p + 2])
            h = grouped_gemv(o3, [ws[p + 3]], glu=True, residual=o2)
        return grouped_gemv(h, [ws[-1]], nw[-1])
    if not a.no_baselines:
        t = graph_us([library_folded if a.folds else library])
        print(f"library, {L} launches (PDL): {t:.0f} us ({nbytes / t / 1e3:.0f} GB/s)", flush=True)
        t = graph_us([lambda: grouped_gemv(x0, [flat.view(-1, 2048)])])
        print(f"the same bytes in one launch: {t:.0f} us ({nbytes / t / 1e3:.0f} GB/s)", flush=True)
    kernel, ws_kernel = _kernel()
    cnt = torch.zeros(L + 1, device=dev, dtype=torch.int32)
    err = torch.zeros(1, device=dev, dtype=torch.int32)
    stats = torch.zeros(4 * (L + 1), device=dev, dtype=torch.float32)  # the folds' sums of squares
    stats0 = x0.float().view(4, -1).pow(2).sum(-1)
    fold_args = meta[:5] + (meta[5], 1e-6, stats) if a.folds else (xoff, ns, xoff, xoff, xoff, xs, 1e-6, stats)
    for index in a.configs if a.configs is not None else range(len(CONFIGS)):
        cfg = CONFIGS[index]
        BN, BK, S, warps, per_sm, wait, PW = cfg.values()
        NX = triton.cdiv(5632, BK)
        x2d = bool(PW) and not a.x_per_block
        if x2d:  # one register tile of x: a power of two K blocks
            NX = triton.next_power_of_2(NX)
        if per_sm * (S * BN * BK * 2 + NX * BK * 4) > 227 * 1024:  # all programs resident, or the counts never arrive
            continue
        if a.folds and not (PW and wait):
            continue
        P = per_sm * sms

        def launch():
            cnt.zero_()
            if a.folds:  # the first product's input has no product before to count its squares
                stats.zero_()
                stats[:4].copy_(stats0)
            args = (flat, xs, ns, ks, woff, xoff, cnt, err, L, P, 1 << 18)
            if PW:  # the slots' barriers: one asynchronous arrival a copying thread; one a release
                ws_kernel[(P,)](*args, *fold_args, BN=BN, BK=BK, S=S, NX=NX, WAIT=wait, PW=PW, EMPTY_COUNT=1,
                                FOLDS=a.folds, HEAD=D_HEAD, X2D=x2d, num_warps=warps)
            else:
                kernel[(P,)](*args, BN=BN, BK=BK, S=S, NX=NX, WAIT=wait, num_warps=warps)
        try:
            err.zero_()
            xs[2048:] = 0
            launch()
            torch.cuda.synchronize()
            worst = 0.
            for i, (w, (n, k)) in enumerate(zip(ws, shapes)):
                y = xs[int(xoff[i + 1]):int(xoff[i + 1]) + n].float()
                if a.folds:
                    r = folded_reference(w, xs, i, k, n, meta).to(bf).float()
                else:
                    x = xs[int(xoff[i]):int(xoff[i]) + k].float()
                    r = (w.float() @ x).to(bf).float()
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


if __name__ == "__main__":
    main()
