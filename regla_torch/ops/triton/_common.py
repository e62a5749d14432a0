"""Shared helpers: chunk bookkeeping for plain and varlen batches; programmatic dependent launch."""
from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

try:  # grid dependency control (Hopper's programmatic dependent launch), Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover (an older Triton: launches stay plain)
    gdc_launch_dependents = gdc_wait = None

BT = 64  # chunk length
BC = 16  # sub-chunk length (reference points for off-diagonal gate factors)
LOG2E = 1.4426950408889634


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class Chunks:
    """Every kernel works on a flat [1, total_T, H, D] view with FlashAttention-style
    offsets; a plain [B, T] batch is just B equal segments, so there is one code path.

    cu: [N+1] int32 segment offsets; cidx: [NT, 2] int32 (segment, chunk in segment)
    in segment order, so a program's chunk id is also its row in the chunk-state
    tensors; coff: [N+1] int32 first chunk id of each segment.
    """

    def __init__(self, B: int, T: int, device, cu_seqlens=None):
        if cu_seqlens is None:
            self.N = B
            nt = (T + BT - 1) // BT
            self.cu = torch.arange(0, B + 1, device=device, dtype=torch.int32) * T
            seg = torch.arange(B, device=device, dtype=torch.int32).repeat_interleave(nt)
            pos = torch.arange(nt, device=device, dtype=torch.int32).repeat(B)
            self.coff = torch.arange(0, B + 1, device=device, dtype=torch.int32) * nt
            self.max_len = T
        else:
            if B != 1:
                raise ValueError(f"cu_seqlens needs batch size 1, got {B}")
            # one host sync: grid sizes depend on the segment lengths
            offs = cu_seqlens.detach().to("cpu", torch.int64).tolist()
            if offs[0] != 0 or offs[-1] != T or any(b < a for a, b in zip(offs, offs[1:])):
                raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {offs}")
            lens = [b - a for a, b in zip(offs, offs[1:])]
            nts = [(n + BT - 1) // BT for n in lens]
            self.N = len(lens)
            self.cu = torch.tensor(offs, device=device, dtype=torch.int32)
            seg = torch.tensor([i for i, n in enumerate(nts) for _ in range(n)],
                               device=device, dtype=torch.int32)
            pos = torch.tensor([c for n in nts for c in range(n)], device=device,
                               dtype=torch.int32)
            co = [0]
            for n in nts:
                co.append(co[-1] + n)
            self.coff = torch.tensor(co, device=device, dtype=torch.int32)
            self.max_len = max(lens) if lens else 0
        self.cidx = torch.stack([seg, pos], 1).contiguous()
        self.NT = int(self.cidx.shape[0])


def dot_precision(dtype) -> str:
    # fp32 inputs are checked against float64 at 1e-5: tf32 (10-bit mantissa) cannot
    # meet that, so fp32 dots run in full precision
    return "ieee" if dtype == torch.float32 else "tf32"


def state_dtype(dtype):
    # chunk-boundary states live in bf16 for bf16 inputs (half the traffic of the
    # biggest intermediate); fp16 cannot hold them (a weakly gated state grows with
    # T past 65504), so fp16 and fp32 keep them in fp32
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


@functools.lru_cache(maxsize=32)
def _plain_chunks(B: int, T: int, device: torch.device) -> Chunks:
    return Chunks(B, T, device)


_VARLEN: dict = {}  # id(cu_seqlens) -> (weakref to it, its version, T, Chunks)


def chunks(B: int, T: int, device, cu_seqlens=None) -> Chunks:
    """The bookkeeping of a batch; that of a plain [B, T] batch is made once and reused, since
    building it costs several small launches per op call (the whole op at small shapes).
    A packed batch's costs a host sync (its grid depends on the segment lengths), so it is kept
    for as long as the same ``cu_seqlens`` tensor, unchanged, comes back: a training step passes
    one tensor to every layer's forward and backward, one sync a step instead of two a layer."""
    if cu_seqlens is None:
        return _plain_chunks(B, T, torch.device(device))
    if cu_seqlens.is_inference():  # no version counter to tell an in-place change: not kept
        return Chunks(B, T, device, cu_seqlens)
    hit = _VARLEN.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[1:3] == (cu_seqlens._version, T):
        return hit[3]
    ch = Chunks(B, T, device, cu_seqlens)
    if len(_VARLEN) >= 8:  # the live entries are the current step's; drop the oldest
        _VARLEN.pop(next(iter(_VARLEN)))
    _VARLEN[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, T, ch)
    return ch


# Programmatic dependent launch (Hopper and later) of the decode kernels (the GEMVs, the
# recurrent step): each may start while the kernels before it finish. It first lets the next
# kernel launch (``gdc_launch_dependents``), loads what no kernel of this step writes (weights,
# the recurrent state and running max written a step ago), then waits (``gdc_wait``) for the
# kernel before it to complete before reading that kernel's output. Every program waits before it
# ends, so a kernel completes only after the one before it did: past the wait, everything
# earlier in the stream is complete (the residual from three launches back too), and a step's
# plain launches (the embedding, the sampling, a graph's end) wait for all of it. PDL took 0.8 us
# off each boundary on the H200, +5% decode; the early launch (LAUNCH_FIRST) +1-2% more
# (BENCHMARKS section 1). None: on where the GPU and Triton have it; False: plain launches (the
# benchmarks' comparison).
PDL: bool | None = None


def pdl_supported(device: torch.device) -> bool:
    return gdc_wait is not None and device.type == "cuda" and _major(device.index) >= 9


@functools.lru_cache(maxsize=None)
def _major(index: int | None) -> int:
    # asked at every decode launch outside a CUDA graph: once per device
    return torch.cuda.get_device_capability(index)[0]


def use_pdl(device: torch.device) -> bool:
    return pdl_supported(device) and PDL is not False


# Where a decode kernel lets the next one launch: first thing (True: the next may launch while
# this one still waits, and hold its slots early) or only after its own wait (False: one kernel
# ahead at most; the benchmarks' comparison).
LAUNCH_FIRST = True


def pdl_mode(device: torch.device) -> int:
    """The kernels' PDL constexpr: 0 plain launch, 1 next launch after the wait, 2 first thing."""
    return 0 if not use_pdl(device) else 2 if LAUNCH_FIRST else 1


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First thing in a decode kernel: under ``pdl_mode`` 2, let the next kernel launch."""
    if PDL == 2:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Before reading what the kernel before wrote: wait for it to complete (then, under
    ``pdl_mode`` 1, let the next kernel launch)."""
    if PDL:
        gdc_wait()
        if PDL == 1:
            gdc_launch_dependents()
