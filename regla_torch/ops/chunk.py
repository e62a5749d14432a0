"""Chunked GLA (MATH.md section 1): plain torch, or Triton on CUDA (see utils.use_triton)."""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from .utils import check_inputs, over_segments, segment_ids, use_triton


def _pair_sums(g, after):
    """``[..., i, j, D]``: sum_{j<s<=i} g_s over the chunk axis (-2) of ``g [..., C, D]``, the
    cumsum over i of the gates masked to s > j (``after`` [C, C, 1]: i > j)."""
    return (g[..., :, None, :] * after).cumsum(-3)


def _suffix_sums(g):
    """sum_{s>t} g_s over the chunk axis (-2): a reverse cumsum shifted by one, not the chunk's
    total minus a prefix sum."""
    later = torch.nn.functional.pad(g[..., 1:, :], (0, 0, 0, 1))
    return later.flip(-2).cumsum(-2).flip(-2)


def _chunk_states(ak, av, u, S0):
    """The state entering each chunk, and the last one, of S_n = (ak_n x av_n) * S_{n-1} + u_n
    (``u [B, N, H, K, V]``, decay factors ``ak [., N, ., K, 1]``, ``av [., N, ., 1, V]``, ``S0 [B, H, K, V]``).
    A scan in log2(N) steps (Hillis-Steele) instead of N dependent steps: a few large ops where a
    loop over chunks issues thousands of small ones (and their backward), which is what bounds
    the chunked GSA's training on a GPU. Only products of decays, never quotients: a decay that
    underflows to 0 stays exact."""
    N, d = u.shape[1], 1
    while d < N:
        u = torch.cat([u[:, :d], u[:, d:] + ak[:, d:] * av[:, d:] * u[:, :-d]], 1)
        ak = torch.cat([ak[:, :d], ak[:, d:] * ak[:, :-d]], 1)
        av = torch.cat([av[:, :d], av[:, d:] * av[:, :-d]], 1)
        d *= 2
    S = u + ak * av * S0[:, None]  # after each chunk: its own part plus the decayed initial state
    return torch.cat([S0[:, None], S[:, :-1]], 1), S[:, -1]


def chunk_gated(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                chunk_size=16, segment_ids=None):
    """Chunked gated linear attention with key-side (``gk``) and/or value-side (``gv``) log gates.

    Exact form: inside a chunk the decay between positions j <= i is ``exp(sum_{j<s<=i} g_s)``
    per channel, masked to j <= i, so every exponent is <= 0 and any finite gate is safe.
    Every exponent is a partial sum formed directly (prefix, suffix or the masked in-chunk
    cumsum of the pairs), never the difference of two prefix sums: after a gate of -1e4 a
    prefix sum has an fp32 ulp of ~1e-3, which the difference of two of them would carry
    into a factor near 1. Memory is O(T * C * D), fine for the reference path; the Triton
    kernels do the same arithmetic with secondary chunking instead.

    ``segment_ids`` (``[T]``, B == 1, no initial state) packs several sequences in one row:
    scores across sequences are masked and the carried state is dropped where a sequence
    starts, so a packed batch costs no more than one sequence of the same length.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = q.dtype
    C = chunk_size
    pad = (-T) % C
    f32 = [None if x is None else x.float() for x in (q, k, v, gk, gv)]
    if pad:
        # zero keys and zero gates past the end: no state update, no decay
        f32 = [None if x is None else torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in f32]
    q_, k_, v_, gk_, gv_ = [None if x is None else x.reshape(B, -1, C, H, x.shape[-1]).transpose(2, 3)
                            for x in f32]  # [B, N, H, C, D]
    N = q_.shape[1]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    keep = None
    if segment_ids is not None:
        seg = torch.cat([segment_ids, segment_ids[-1:].expand(pad)]).view(N, C)  # the last sequence's
        entering = torch.cat([seg[:1, :1], seg[:-1, -1:]], 0)  # the sequence the state belongs to
        causal = causal & (seg[:, :, None] == seg[:, None, :])[None, :, None]  # [1, N, 1, C, C]
        reads_state = (seg == entering)[None, :, None, :, None].float()
        reaches_end = (seg == seg[:, -1:])[None, :, None, :, None].float()
        keep = (seg[:, -1] == entering[:, 0]).float()
    after = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)[..., None]  # s = i > j
    if gk_ is not None:
        bk = gk_.cumsum(3)
        dk = torch.where(causal[..., None], _pair_sums(gk_, after), float("-inf")).exp()
        A = torch.einsum("bnhik,bnhjk,bnhijk->bnhij", q_, k_, dk)
        q_in, k_in = q_ * bk.exp(), k_ * _suffix_sums(gk_).exp()
    else:
        A = (q_ @ k_.transpose(-1, -2)).masked_fill(~causal, 0.0)
        q_in, k_in = q_, k_
    if gv_ is not None:
        bv = gv_.cumsum(3)
        dv = torch.where(causal[..., None], _pair_sums(gv_, after), float("-inf")).exp()
        intra = torch.einsum("bnhij,bnhijv,bnhjv->bnhiv", A, dv, v_)
        v_in = v_ * _suffix_sums(gv_).exp()
    else:
        intra = A @ v_
        v_in = v_
    if keep is not None:
        q_in, k_in = q_in * reads_state, k_in * reaches_end
    S0 = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    # what each chunk does to the state: S <- (ak x av) * S + k_in^T v_in, decays kept as factors
    ak = bk[:, :, :, -1, :, None].exp() if gk_ is not None else q_.new_ones(1, N, 1, 1, 1)
    av = bv[:, :, :, -1, None, :].exp() if gv_ is not None else q_.new_ones(1, N, 1, 1, 1)
    if keep is not None:
        ak = ak * keep[None, :, None, None, None]
    u = k_in.transpose(-1, -2) @ v_in
    if torch.is_grad_enabled():  # the scan's log2(N) intermediate states are recomputed, not kept
        S_in, S = torch.utils.checkpoint.checkpoint(_chunk_states, ak, av, u, S0, use_reentrant=False)
    else:
        S_in, S = _chunk_states(ak, av, u, S0)
    inter = q_in @ S_in
    if gv_ is not None:
        inter = inter * bv.exp()
    o = scale * (inter + intra)  # [B, N, H, C, V]
    o = o.transpose(2, 3).reshape(B, N * C, H, V)[:, :T]
    return o.to(dtype), (S if output_final_state else None)


def _torch_chunk_gla(q, k, v, g, scale, initial_state, output_final_state):
    return chunk_gated(q, k, v, g, None, scale, initial_state, output_final_state)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """GLA over a whole sequence, chunked. ``[B,T,H,D]`` layout, log-space per-key gate ``g``.

    Returns ``(o, final_state)``; ``final_state`` (float32 ``[B or N, H, K, V]``) is None
    unless ``output_final_state``. With ``cu_seqlens`` (B == 1) segments do not see each other.
    """
    check_inputs(q, k, v, g, initial_state, cu_seqlens)
    if use_triton(q):
        from .triton import chunk_gla as triton_chunk_gla
        return triton_chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None:
        if initial_state is None and not output_final_state:  # training: one pass over the row
            return chunk_gated(q, k, v, g, None, scale, segment_ids=segment_ids(cu_seqlens, q.shape[1]))
        return over_segments(_torch_chunk_gla, q, k, v, g, scale, initial_state, output_final_state,
                             cu_seqlens)
    return _torch_chunk_gla(q, k, v, g, scale, initial_state, output_final_state)
