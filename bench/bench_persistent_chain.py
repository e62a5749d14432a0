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

    python bench/bench_persistent_chain.py

Written in Gluon (Triton's lower-level dialect: explicit shared memory and cp.async); GPU only
(Hopper), it does not run in Triton's interpreter. Each launch shape is checked product by
product against float32 products of the kernel's own inputs before it is timed; a count that
never arrives (programs not all resident) ends the wait after a bounded number of polls and is
reported, not hung on. ``WAIT=False`` launch shapes drop the data dependency (no count waited
on: the outputs are wrong, the time is the weight stream's alone).

H200, 2026-12-04 (BENCHMARKS section 1, twelfth session): at its best (16 rows x 1024 a tile, 4-6
slots) 859-896 us against 859-873 for the library's 97 launches and 580-599 for the same bytes in
one launch: no faster. Without the dependency 695-739 us: the stream runs at 3.5-3.7 TB/s (one
warp group both copies and multiplies, a CTA barrier a tile; 16 KB tiles are slower, 743-798),
and each product's dependency still costs ~1.6 us. The first version, reading each tile's slice
of x from L2 beside the tile, took 4,400 us; polling the count with volatile loads and then one
acquire, 20-25 us more than acquire polls.
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
        pk += 1
        if pk * BK >= kq:
            pk = pk * 0
            pl2, pb = _skip(pl, pb + P, ns, L, pid, BN)
            if pl2 != pl:
                kq, wb = _meta(pl2, ks, woff, L)
            pl = pl2
        return pl, pb, pk, kq, wb

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
            if WAIT and l > 0:  # the product's input: every program done with product l - 1
                # polled by acquire loads (an add of 0 compiles to ld.acquire.gpu): the last poll
                # orders this program's reads of the product's input after the count
                seen = gl.atomic_add(cnt + l, 0, sem="acquire", scope="gpu")
                it = 0
                while (seen < P) & (it < LIMIT):
                    seen = gl.atomic_add(cnt + l, 0, sem="acquire", scope="gpu")
                    it += 1
                if seen < P:
                    gl.store(err, 1)
            for i in gl.static_range(NX):  # all of x's loads in flight at once
                sx.index(i).store(gl.load(xs + xo + i * BK + cx, mask=i * BK + cx < k_l, other=0.,
                                          cache_modifier=".cg").to(gl.float32))
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
    return _chain_kernel


def main():
    from bench_gemv import graph_us

    from regla_torch.ops.triton.gemv import grouped_gemv
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
    print(f"{torch.cuda.get_device_name()} ({sms} SMs), torch {torch.__version__}, triton {triton.__version__}; "
          f"{L} plain products, {nbytes / 1e9:.2f} GB", flush=True)

    x0 = xs[:2048].view(1, -1).clone()

    def library():
        x = x0
        for w in ws:
            x = grouped_gemv(x[:, :w.shape[1]], [w])
        return x
    t = graph_us([library])
    print(f"library, {L} launches (PDL): {t:.0f} us ({nbytes / t / 1e3:.0f} GB/s)", flush=True)
    t = graph_us([lambda: grouped_gemv(x0, [flat.view(-1, 2048)])])
    print(f"the same bytes in one launch: {t:.0f} us ({nbytes / t / 1e3:.0f} GB/s)", flush=True)
    kernel = _kernel()
    cnt = torch.zeros(L + 1, device=dev, dtype=torch.int32)
    err = torch.zeros(1, device=dev, dtype=torch.int32)
    # (rows a block, K block, ring slots, warps, programs an SM, keep the data dependency)
    for BN, BK, S, warps, per_sm, wait in [
            (16, 512, 8, 4, 1, True), (16, 512, 8, 4, 1, False), (16, 512, 4, 4, 1, True), (16, 512, 6, 4, 1, True),
            (16, 512, 12, 4, 1, True), (8, 512, 12, 4, 1, True), (8, 512, 12, 4, 1, False), (16, 256, 16, 4, 1, True),
            (16, 512, 4, 4, 2, True), (16, 512, 4, 4, 2, False), (8, 512, 8, 4, 2, True), (8, 512, 4, 4, 3, True),
            (16, 1024, 4, 4, 1, True), (16, 1024, 4, 4, 1, False), (16, 1024, 5, 8, 1, True),
            (16, 1024, 5, 8, 1, False), (8, 1024, 8, 4, 1, True), (8, 1024, 8, 4, 1, False),
            (8, 2048, 4, 4, 1, True), (8, 2048, 4, 4, 1, False), (16, 2048, 2, 8, 1, True), (16, 2048, 2, 8, 1, False),
            (4, 2048, 8, 4, 1, True), (16, 1024, 6, 4, 1, True), (16, 1024, 6, 4, 1, False), (16, 1024, 6, 8, 1, True),
            (16, 1024, 6, 8, 1, False), (16, 1024, 5, 4, 1, True)]:
        cfg = dict(BN=BN, BK=BK, S=S, num_warps=warps, per_sm=per_sm, WAIT=wait)
        if per_sm * (S * BN * BK * 2 + triton.cdiv(5632, BK) * BK * 4) > 220 * 1024:  # all programs resident, or the counts never arrive
            continue
        P = per_sm * sms

        def launch():
            cnt.zero_()
            kernel[(P,)](flat, xs, ns, ks, woff, xoff, cnt, err, L, P, 1 << 18, BN=BN, BK=BK, S=S,
                           NX=triton.cdiv(5632, BK), WAIT=wait, num_warps=warps)
        try:
            err.zero_()
            xs[2048:] = 0
            launch()
            torch.cuda.synchronize()
            worst = 0.
            for i, (w, (n, k)) in enumerate(zip(ws, shapes)):
                x = xs[int(xoff[i]):int(xoff[i]) + k].float()
                y = xs[int(xoff[i + 1]):int(xoff[i + 1]) + n].float()
                r = (w.float() @ x).to(bf).float()
                worst = max(worst, float((y - r).norm() / r.norm()))
            if not wait:  # no data dependency kept: the outputs are not the products
                worst = float("nan")
            if int(err):
                print(f"  {cfg}: a count never arrived (programs not all resident?)", flush=True)
                continue
            t = graph_us([launch])
        except Exception as e:  # noqa: BLE001 (a shape the compiler or the GPU refuses)
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(f"  one persistent kernel {cfg}: {t:.0f} us ({nbytes / t / 1e3:.0f} GB/s), worst product's rel err "
              f"{worst:.1e}", flush=True)


if __name__ == "__main__":
    main()
