"""Chunk gradients: dv, then dq, dk and dg, from the states (hs) and state gradients (dhs) of the chunk pass.

GLA paper (Yang et al. 2024), §4.2 and App. (backward). Per chunk, with scaled scores A (from the forward),
S / S' the states entering / leaving it, dS' the gradient of S', dA = scale * do @ v^T (lower triangle):

    dv = A^T @ do + (k * exp(gl - gc)) @ dS'
    dq = scale * (do @ S^T) * exp(gc)        + sum_{j<=i} dA_ij k_j exp(gc_i - gc_j)
    dk = (v @ dS'^T) * exp(gl - gc)          + sum_{i>=j} dA_ij q_i exp(gc_i - gc_j)
    dg = reverse cumsum over the chunk of (q * dq - k * dk) + sum_v S' * dS'

The last term is the gate gradient contributed by all later tokens: perturbing g at the first token of the next
chunk by eps scales S' by exp(eps), so the suffix sum of (q dq - k dk) beyond this chunk equals sum_v S' * dS' (for
the last chunk S' is the final state and dS' its incoming gradient: the final-state term of DESIGN.md). So dg needs
no pass over the whole sequence. The intra-chunk sums use the same safe / log-space split as the forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import BT, SAFE_DECAY, ChunkMeta, chunk_bounds, config, dot_dtype


@triton.jit
def dqk_logspace(b_dA, b_q, b_k, b_gc, BT: tl.constexpr):
    """Intra-chunk dq, dk ([BT, BK] each) from dA [BT, BT] (lower-triangular) in log space: token t contributes
    dA[:, t] k_t exp(gc - gc_t) to dq (rows i >= t) and dA[t, :] q_t exp(gc_t - gc) to dk (rows j <= t)."""
    o_t = tl.arange(0, BT)
    b_dq = tl.zeros(b_q.shape, dtype=tl.float32)
    b_dk = tl.zeros(b_k.shape, dtype=tl.float32)
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
def chunk_dv_bwd_kernel(k, g, do, A, dhs, dv, cu_seqlens, chunk_indices, chunk_offsets, T,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """k, g: [B*T, H, K]; do, dv: [B*T, H, V]; A: [B*T, H, BT]; dhs: [NC, H, K, V]."""
    i_v, i_c, i_h = tl.program_id(0) % tl.cdiv(V, BV), tl.program_id(0) // tl.cdiv(V, BV), tl.program_id(1)
    i_t, bos, eos, boh = chunk_bounds(i_c, cu_seqlens, chunk_indices, chunk_offsets, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    rows = bos + i_t * BT + o_t
    m_t = rows < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_dh = dhs + (i_c.to(tl.int64) * H + i_h) * K * V

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32)
        b_g = tl.load(g + p_k, mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32)
        b_gc = tl.cumsum(b_g, 0)
        b_gl = tl.sum(b_g, 0)
        b_kd = (b_k * tl.exp(b_gl[None, :] - b_gc)).to(DOT)
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_dv += tl.dot(b_kd, b_dh.to(DOT), input_precision="ieee")
    b_A = tl.load(A + (rows[:, None] * H + i_h) * BT + o_t[None, :], mask=m_t[:, None], other=0.)
    p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_do = tl.load(do + p_v, mask=m_tv, other=0.)
    b_dv += tl.dot(tl.trans(b_A.to(DOT)), b_do.to(DOT), input_precision="ieee")
    tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)


@triton.jit
def chunk_dqkg_bwd_kernel(q, k, v, g, do, hs, dhs, dq, dk, dg, scale, cu_seqlens, chunk_indices, chunk_offsets, T,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, SAFE: tl.constexpr,
                          IS_VARLEN: tl.constexpr):
    """q, k, g, dq, dk, dg: [B*T, H, K]; v, do: [B*T, H, V]; hs: [slots, H, K, V]; dhs: [NC, H, K, V]."""
    # K tiles of one chunk are adjacent program ids, so they share v, do through L2
    i_k, i_c, i_h = tl.program_id(0) % tl.cdiv(K, BK), tl.program_id(0) // tl.cdiv(K, BK), tl.program_id(1)
    i_t, bos, eos, boh = chunk_bounds(i_c, cu_seqlens, chunk_indices, chunk_offsets, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    rows = bos + i_t * BT + o_t
    m_t = rows < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_h = hs + ((boh + i_t) * H + i_h) * K * V + o_k[:, None] * V
    p_dh = dhs + (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_v = (rows[:, None] * H + i_h) * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_t[:, None] & m_v[None, :], other=0.).to(DOT)
        b_do = tl.load(do + p_v, mask=m_t[:, None] & m_v[None, :], other=0.).to(DOT)
        m_kv = m_k[:, None] & m_v[None, :]
        b_h = tl.load(p_h + o_v[None, :], mask=m_kv, other=0.)
        b_hn = tl.load(p_h + H * K * V + o_v[None, :], mask=m_kv, other=0.)
        b_dh = tl.load(p_dh + o_v[None, :], mask=m_kv, other=0.)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_dq += tl.dot(b_do, tl.trans(b_h.to(DOT)), input_precision="ieee")
        b_dk += tl.dot(b_v, tl.trans(b_dh.to(DOT)), input_precision="ieee")
        b_dgl += tl.sum(b_hn.to(tl.float32) * b_dh.to(tl.float32), 1)
    # q, k, g are loaded only now: keeping them live through the V loop spills registers
    p_q = (rows[:, None] * H + i_h) * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load(q + p_q, mask=m_tk, other=0.).to(tl.float32)
    b_k = tl.load(k + p_q, mask=m_tk, other=0.).to(tl.float32)
    b_g = tl.load(g + p_q, mask=m_tk, other=0.).to(tl.float32)
    b_gc = tl.cumsum(b_g, 0)
    b_gl = tl.sum(b_g, 0)
    b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA * scale, 0.)
    b_dq = b_dq * scale * tl.exp(b_gc)
    b_dk = b_dk * tl.exp(b_gl[None, :] - b_gc)
    if tl.min(b_gc) >= -SAFE:
        b_eg = tl.exp(b_gc)
        b_qg = (b_q * b_eg).to(DOT)
        b_kg = (b_k / b_eg).to(DOT)
        b_dAd = b_dA.to(DOT)
        b_dq += tl.dot(b_dAd, b_kg, input_precision="ieee") * b_eg
        b_dk += tl.dot(tl.trans(b_dAd), b_qg, input_precision="ieee") / b_eg
    else:
        b_dqi, b_dki = dqk_logspace(b_dA, b_q, b_k, b_gc, BT)
        b_dq += b_dqi
        b_dk += b_dki
    b_dg = tl.cumsum(b_q * b_dq - b_k * b_dk, 0, reverse=True) + b_dgl[None, :]
    tl.store(dq + p_q, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_q, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dg + p_q, b_dg.to(dg.dtype.element_ty), mask=m_tk)


def chunk_bwd(q, k, v, g, do, A, hs, dhs, scale: float, meta: ChunkMeta):
    """All inputs [B, T, H, *] contiguous; A, hs from the forward, dhs from ``chunk_state_bwd``.
    Returns dq, dk, dv, dg in the dtypes of q, k, v, g."""
    B, T, H, K = q.shape
    V = v.shape[3]
    DOT = dot_dtype(q.dtype)
    dv = torch.empty_like(v)
    c = config("dv", K, V)
    chunk_dv_bwd_kernel[(meta.NC * triton.cdiv(V, c["BV"]), H)](
        k, g, do, A, dhs, dv, meta.cu_seqlens, meta.chunk_indices, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT=DOT, IS_VARLEN=meta.varlen, num_stages=2, **c)
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g)
    c = config("dqkg", K, V)
    chunk_dqkg_bwd_kernel[(meta.NC * triton.cdiv(K, c["BK"]), H)](
        q, k, v, g, do, hs, dhs, dq, dk, dg, scale, meta.cu_seqlens, meta.chunk_indices, meta.chunk_offsets,
        meta.T, H=H, K=K, V=V, BT=BT, DOT=DOT, SAFE=SAFE_DECAY, IS_VARLEN=meta.varlen, num_stages=2, **c)
    return dq, dk, dv, dg
