"""Chunk outputs, forward: the inter-chunk part from the entering state plus the intra-chunk attention block.

GLA paper (Yang et al. 2024), §4.2-4.3. For a chunk with entering state S and cumulative log-decay gc:

    o = scale * (q * exp(gc)) @ S + A @ v,    A[i, j] = scale * sum_k q_ik k_jk exp(gc_ik - gc_jk)  (j <= i)

The intra block A is one matrix product (q * exp(gc)) @ (k * exp(-gc))^T when the chunk's total decay is at most
SAFE_DECAY (exp(-gc) <= exp(60) cannot overflow); with stronger gates it is built in log space one key column at a
time, where every exponent gc_ik - gc_jk (i >= j) is <= 0. This plays the role of the paper's secondary-level
chunking (§4.3): full precision where the decay is large, tensor cores where it is safe. The check is per chunk and
K-tile (gc comes from gate.py), so ordinary gates (log-decay of a few units per chunk) always take the
matrix-product path.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch.library import wrap_triton

from .utils import BT, SAFE_DECAY, ChunkMeta, cdiv, chunk_bounds, config, dot16, kept_dtype, tile, to_dot


@triton.jit
def attn_logspace(b_A, b_q, b_k, b_gc, BT: tl.constexpr):
    """Adds to b_A [BT, BT] the scores sum_k q_ik k_jk exp(gc_ik - gc_jk) for j <= i (above the diagonal: don't
    care), column by column with exponents clamped to <= 0. b_q, b_k, b_gc: [BT, BK] fp32. Accumulating in place
    keeps this rarely taken branch from raising the register count of the whole kernel."""
    o_t = tl.arange(0, BT)
    for j in range(0, BT):
        m_j = o_t == j
        b_kj = tl.sum(tl.where(m_j[:, None], b_k, 0.), 0)
        b_gj = tl.sum(tl.where(m_j[:, None], b_gc, 0.), 0)
        b_a = tl.sum(b_q * b_kj[None, :] * tl.exp(tl.minimum(b_gc - b_gj[None, :], 0.)), 1)
        b_A += tl.where(m_j[None, :], b_a[:, None], 0.)
    return b_A


@triton.jit
def chunk_output_fwd_kernel(q, k, v, gc, hs, o, A, scale, cu_seqlens, chunk_indices, chunk_offsets, T,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, DOT16: tl.constexpr,
                            SAFE: tl.constexpr, STORE_A: tl.constexpr, IS_VARLEN: tl.constexpr):
    """q, k: [B*T, H, K]; gc: [B*T, H, K] fp32; v, o: [B*T, H, V]; hs: [slots, H, K, V]; A: [B*T, H, BT] (scaled,
    lower-triangular)."""
    # V tiles of one chunk are adjacent program ids, so they share q, k, gc through L2
    i_v, i_c, i_h = tl.program_id(0) % tl.cdiv(V, BV), tl.program_id(0) // tl.cdiv(V, BV), tl.program_id(1)
    i_t, bos, eos, boh = chunk_bounds(i_c, cu_seqlens, chunk_indices, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    t0 = i_t * BT
    o_t = tl.arange(0, BT)
    o_k = (bos * H + i_h) * K
    o_v = (bos * H + i_h) * V
    p_h = hs + ((boh + i_t) * H + i_h) * K * V
    K_ok = (t0 < L).to(tl.int32) * K  # spare varlen chunk ids (t0 >= L) have no entering state: read none of it

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        p_q, m_q = tile(q + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
        p_k, _ = tile(k + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
        p_g, _ = tile(gc + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
        p_hk, m_h = tile(p_h, i_k * BK, K_ok, i_v * BV, V, V, 1, BK, BV)
        b_q = (tl.load(p_q, mask=m_q, other=0.).to(tl.float32) * scale).to(tl.float32)
        b_k = tl.load(p_k, mask=m_q, other=0.).to(tl.float32)
        b_gc = tl.load(p_g, mask=m_q, other=0.)
        b_h = tl.load(p_hk, mask=m_h, other=0.)
        b_qg = b_q * tl.exp(b_gc)
        b_o += tl.dot(to_dot(b_qg, DOT16), to_dot(b_h, DOT16), input_precision="ieee")
        if tl.min(b_gc) >= -SAFE:
            b_kg = to_dot(b_k * tl.exp(-b_gc), DOT16)
            b_A += tl.dot(to_dot(b_qg, DOT16), tl.trans(b_kg), input_precision="ieee")
        else:
            b_A = attn_logspace(b_A, b_q, b_k, b_gc, BT)
    b_A = tl.where(o_t[:, None] >= o_t[None, :], b_A, 0.)
    p_v, m_v = tile(v + o_v, t0, L, i_v * BV, V, H * V, 1, BT, BV)
    b_v = tl.load(p_v, mask=m_v, other=0.)
    b_o += tl.dot(to_dot(b_A, DOT16), to_dot(b_v, DOT16), input_precision="ieee")
    p_o, _ = tile(o + o_v, t0, L, i_v * BV, V, H * V, 1, BT, BV)
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_A:
        if i_v == 0:
            p_A, m_A = tile(A + (bos * H + i_h) * BT, t0, L, 0, BT, H * BT, 1, BT, BT)
            tl.store(p_A, to_dot(b_A, DOT16).to(A.dtype.element_ty), mask=m_A)


def chunk_output_fwd(q, k, v, gc, hs, scale: float, meta: ChunkMeta, store_A: bool):
    """q, k: [B, T, H, K]; gc: [B, T, H, K] fp32; v: [B, T, H, V]; hs from ``chunk_state_fwd``.
    Returns o [B, T, H, V] (v's dtype) and A [B, T, H, BT] (the scaled intra-chunk scores, for the backward) or None."""
    B, T, H, K = q.shape
    V = v.shape[3]
    o = v.new_empty(B, T, H, V)
    A = q.new_empty(B, T, H, BT, dtype=kept_dtype(q.dtype)) if store_A else None
    c = config("output", K, V)
    grid = (meta.NC * cdiv(V, c["BV"]), H)
    wrap_triton(chunk_output_fwd_kernel)[grid](
        q, k, v, gc, hs, o, A, scale, meta.cu_seqlens, meta.chunk_indices, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT16=dot16(q.dtype), SAFE=SAFE_DECAY, STORE_A=store_A,
        IS_VARLEN=meta.varlen, num_stages=2, **c)
    return o, A
