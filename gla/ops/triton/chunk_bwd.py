"""Chunk gradients: dv, then dq, dk and dg, from the states (hs) and state gradients (dhs) of the chunk pass.

GLA paper (Yang et al. 2024), §4.2 and App. (backward). Per chunk, with scaled scores A (from the forward),
S / S' the states entering / leaving it, dS' the gradient of S', dA = scale * do @ v^T (lower triangle):

    dv = A^T @ do + (k * exp(gl - gc)) @ dS'
    dq = scale * (do @ S^T) * exp(gc)        + sum_{j<=i} dA_ij k_j exp(gc_i - gc_j)
    dk = (v @ dS'^T) * exp(gl - gc)          + sum_{i>=j} dA_ij q_i exp(gc_i - gc_j)
    dg = reverse cumsum over the chunk of (q * dq - k * dk) + sum_v S' * dS'
       = reverse cumsum over the chunk of (q * dq - k * dk) + exp(gl) * sum_v S * dS' + sum_t k * dk_inter

sum_v S' * dS' is the gate gradient contributed by all later tokens: perturbing g at the first token of the next
chunk by eps scales S' by exp(eps), so the suffix sum of (q dq - k dk) beyond this chunk equals it (for the last
chunk S' is the final state and dS' its incoming gradient: the final-state term of DESIGN.md). So dg needs no pass
over the whole sequence. The second line splits S' = exp(gl) S + sum_t (k_t exp(gl - gc_t))^T v_t: the chunk's own
part, summed against dS', is sum_t k_t * dk_inter_t, which the reverse cumsum subtracts again. Under strong gates
that part is nearly all of both terms, so it must cancel exactly: computed from dk_inter itself (the same rounded
dS' as the product) it does, where sum_v S' * dS' from a separately rounded S' left errors of 4e-2 in dg. It also
means S' is never read here (one state read fewer) and states can be kept in bf16. The intra-chunk sums use the
same safe / log-space split as the forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .utils import BT, SAFE_DECAY, ChunkMeta, cdiv, chunk_bounds, config, dot16, last_row, tile, to_dot


@triton.jit
def dqk_logspace(b_dq, b_dk, b_dA, b_q, b_k, b_gc, BT: tl.constexpr):
    """Adds the intra-chunk dq, dk ([BT, BK] each) from dA [BT, BT] (lower-triangular) in log space: token t
    contributes dA[:, t] k_t exp(gc - gc_t) to dq (rows i >= t) and dA[t, :] q_t exp(gc_t - gc) to dk (rows j <= t).
    Accumulates in place to keep this rarely taken branch from raising the kernel's register count."""
    o_t = tl.arange(0, BT)
    for t in range(0, BT):
        m_c = o_t == t
        b_qt = tl.sum(tl.where(m_c[:, None], b_q, 0.), 0)
        b_kt = tl.sum(tl.where(m_c[:, None], b_k, 0.), 0)
        b_gt = tl.sum(tl.where(m_c[:, None], b_gc, 0.), 0)
        b_col = tl.sum(tl.where(m_c[None, :], b_dA, 0.), 1)  # dA[:, t]
        b_row = tl.sum(tl.where(m_c[:, None], b_dA, 0.), 0)  # dA[t, :]
        b_dq += b_col[:, None] * b_kt[None, :] * tl.exp(tl.minimum(b_gc - b_gt[None, :], 0.))
        b_dk += b_row[:, None] * b_qt[None, :] * tl.exp(tl.minimum(b_gt[None, :] - b_gc, 0.))
    return b_dq, b_dk


@triton.jit
def chunk_dv_bwd_kernel(k, gc, do, A, dhs, dv, cu_seqlens, chunk_indices, chunk_offsets, T,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, DOT16: tl.constexpr, IS_VARLEN: tl.constexpr):
    """k: [B*T, H, K]; gc: [B*T, H, K] fp32; do, dv: [B*T, H, V]; A: [B*T, H, BT]; dhs: [NC, H, K, V]."""
    i_v, i_c, i_h = tl.program_id(0) % tl.cdiv(V, BV), tl.program_id(0) // tl.cdiv(V, BV), tl.program_id(1)
    i_t, bos, eos, _slot = chunk_bounds(i_c, cu_seqlens, chunk_indices, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    t0 = i_t * BT
    o_k = (bos * H + i_h) * K
    o_v = (bos * H + i_h) * V
    p_dh = dhs + (i_c.to(tl.int64) * H + i_h) * K * V
    K_ok = (t0 < L).to(tl.int32) * K  # spare varlen chunk ids (t0 >= L) have no dhs: read none of it

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        p_k, m_k = tile(k + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
        p_g, _ = tile(gc + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
        p_dhk, m_h = tile(p_dh, i_k * BK, K_ok, i_v * BV, V, V, 1, BK, BV)
        b_k = tl.load(p_k, mask=m_k, other=0.)
        b_gc = tl.load(p_g, mask=m_k, other=0.)
        b_dh = tl.load(p_dhk, mask=m_h, other=0.)
        b_gl = last_row(gc + o_k, tl.minimum(t0 + BT, L), i_k * BK, K, H * K, BK)
        b_kd = to_dot(b_k * tl.exp(b_gl[None, :] - b_gc), DOT16)
        b_dv += tl.dot(b_kd, to_dot(b_dh, DOT16), input_precision="ieee")
    # A^T, read through transposed strides
    p_At, m_At = tile(A + (bos * H + i_h) * BT, 0, BT, t0, L, 1, H * BT, BT, BT)
    p_do, m_do = tile(do + o_v, t0, L, i_v * BV, V, H * V, 1, BT, BV)
    b_At = tl.load(p_At, mask=m_At, other=0.)
    b_do = tl.load(p_do, mask=m_do, other=0.)
    b_dv += tl.dot(to_dot(b_At, DOT16), to_dot(b_do, DOT16), input_precision="ieee")
    p_dv, _ = tile(dv + o_v, t0, L, i_v * BV, V, H * V, 1, BT, BV)
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_do)


@triton.jit
def chunk_dqkg_bwd_kernel(q, k, v, gc, do, hs, dhs, dq, dk, dg, scale, cu_seqlens, chunk_indices, chunk_offsets, T,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, DOT16: tl.constexpr,
                          SAFE: tl.constexpr, IS_VARLEN: tl.constexpr):
    """q, k, dq, dk, dg: [B*T, H, K]; gc: [B*T, H, K] fp32; v, do: [B*T, H, V]; hs: [slots, H, K, V];
    dhs: [NC, H, K, V]."""
    # K tiles of one chunk are adjacent program ids, so they share v, do through L2
    i_k, i_c, i_h = tl.program_id(0) % tl.cdiv(K, BK), tl.program_id(0) // tl.cdiv(K, BK), tl.program_id(1)
    i_t, bos, eos, boh = chunk_bounds(i_c, cu_seqlens, chunk_indices, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    t0 = i_t * BT
    o_t = tl.arange(0, BT)
    o_v = (bos * H + i_h) * V
    p_h = hs + ((boh + i_t) * H + i_h) * K * V
    p_dh = dhs + (i_c.to(tl.int64) * H + i_h) * K * V
    V_ok = (t0 < L).to(tl.int32) * V  # spare varlen chunk ids (t0 >= L) have no states: read none of them

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        p_v, m_v = tile(v + o_v, t0, L, i_v * BV, V, H * V, 1, BT, BV)
        p_do, _ = tile(do + o_v, t0, L, i_v * BV, V, H * V, 1, BT, BV)
        # states read transposed ([BV, BK]) so that both products below are plain row-major
        o_ht, m_ht = tile(0, i_v * BV, V_ok, i_k * BK, K, 1, V, BV, BK)
        b_v = to_dot(tl.load(p_v, mask=m_v, other=0.), DOT16)
        b_do = to_dot(tl.load(p_do, mask=m_v, other=0.), DOT16)
        b_ht = to_dot(tl.load(p_h + o_ht, mask=m_ht, other=0.), DOT16)
        b_dht = to_dot(tl.load(p_dh + o_ht, mask=m_ht, other=0.), DOT16)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_dq += tl.dot(b_do, b_ht, input_precision="ieee")
        b_dk += tl.dot(b_v, b_dht, input_precision="ieee")
        b_dgl += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)
    # q, k, gc are loaded only now: keeping them live through the V loop costs registers
    o_k = (bos * H + i_h) * K
    p_q, m_q = tile(q + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
    p_k, _ = tile(k + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
    p_g, _ = tile(gc + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
    b_q = tl.load(p_q, mask=m_q, other=0.).to(tl.float32)
    b_k = tl.load(p_k, mask=m_q, other=0.).to(tl.float32)
    b_gc = tl.load(p_g, mask=m_q, other=0.)
    b_gl = last_row(gc + o_k, tl.minimum(t0 + BT, L), i_k * BK, K, H * K, BK)
    b_dA = tl.where(o_t[:, None] >= o_t[None, :], (b_dA * scale).to(tl.float32), 0.)
    b_dq = (b_dq * scale).to(tl.float32) * tl.exp(b_gc)
    b_dk = b_dk * tl.exp(b_gl[None, :] - b_gc)
    b_dgl = b_dgl * tl.exp(b_gl) + tl.sum(b_k * b_dk, 0)  # exp(gl) sum_v S * dS' + sum_t k * dk_inter
    if tl.min(b_gc) >= -SAFE:
        b_eg = tl.exp(b_gc)
        b_qg = to_dot(b_q * b_eg, DOT16)
        b_kg = to_dot(b_k * tl.exp(-b_gc), DOT16)
        b_dAd = to_dot(b_dA, DOT16)
        b_dq += tl.dot(b_dAd, b_kg, input_precision="ieee") * b_eg
        b_dk += tl.dot(tl.trans(b_dAd), b_qg, input_precision="ieee") * tl.exp(-b_gc)
    else:
        b_dq, b_dk = dqk_logspace(b_dq, b_dk, b_dA, b_q, b_k, b_gc, BT)
    b_dg = tl.cumsum(b_q * b_dq - b_k * b_dk, 0, reverse=True) + b_dgl[None, :]
    p_dq, _ = tile(dq + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
    p_dk, _ = tile(dk + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
    p_dg, _ = tile(dg + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
    tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_q)
    tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_q)
    tl.store(p_dg, b_dg.to(dg.dtype.element_ty), mask=m_q)


def chunk_bwd(q, k, v, gc, do, A, hs, dhs, scale: float, meta: ChunkMeta, g_dtype: torch.dtype):
    """All inputs [B, T, H, *] contiguous; gc: the fp32 in-chunk cumsum of g; A, hs from the forward, dhs from
    ``chunk_state_bwd``. Returns dq, dk, dv in the dtypes of q, k, v and dg in g_dtype."""
    H, K = q.shape[2], q.shape[3]
    V = v.shape[3]
    DOT16 = dot16(q.dtype)
    dv = torch.empty_like(v)
    c = config("dv", K, V)
    wrap_triton(chunk_dv_bwd_kernel)[(meta.NC * cdiv(V, c["BV"]), H)](
        k, gc, do, A, dhs, dv, meta.cu_seqlens, meta.chunk_indices, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT16=DOT16, IS_VARLEN=meta.varlen, num_stages=2, **c)
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(gc, dtype=g_dtype)
    c = config("dqkg", K, V)
    # Square tiles: with BV != BK, Triton 3.6 miscompiles this kernel's bf16 products on the H200 whenever the V loop
    # is not software-pipelined (one V tile, e.g. K=16/V=32, K=V=64): dq, dk, dg came out wrong or NaN, or the launch
    # faulted. Square 64 x 64 tiles with 8 warps measured as fast as 32 x 32 at H=16 and 4% faster at GLA-340M's
    # heads (benchmarks/NOTES.md, v6.1).
    c["BK"] = c["BV"] = min(c["BK"], c["BV"])
    wrap_triton(chunk_dqkg_bwd_kernel)[(meta.NC * cdiv(K, c["BK"]), H)](
        q, k, v, gc, do, hs, dhs, dq, dk, dg, scale, meta.cu_seqlens, meta.chunk_indices, meta.chunk_offsets,
        meta.T, H=H, K=K, V=V, BT=BT, DOT16=DOT16, SAFE=SAFE_DECAY, IS_VARLEN=meta.varlen, num_stages=2, **c)
    return dq, dk, dv, dg
