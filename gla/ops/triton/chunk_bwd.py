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

from .utils import BT, SAFE_DECAY, ChunkMeta, chunk_bounds, chunk_cumsum, config, dot_dtype, gate_dtype


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
def chunk_dv_bwd_kernel(k, g, do, A, dhs, dv, cu_seqlens, chunk_indices, chunk_offsets, T,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, GDOT: tl.constexpr,
                        IS_VARLEN: tl.constexpr):
    """k, g: [B*T, H, K]; do, dv: [B*T, H, V]; A: [B*T, H, BT]; dhs: [NC, H, K, V]."""
    i_v, i_c, i_h = tl.program_id(0) % tl.cdiv(V, BV), tl.program_id(0) // tl.cdiv(V, BV), tl.program_id(1)
    i_t, bos, eos, boh = chunk_bounds(i_c, cu_seqlens, chunk_indices, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    p_kg = (bos * H + i_h) * K
    p_dh = dhs + (i_c.to(tl.int64) * H + i_h) * K * V

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        p_k = tl.make_block_ptr(k + p_kg, (L, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_g = tl.make_block_ptr(g + p_kg, (L, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_dhk = tl.make_block_ptr(p_dh, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")
        b_g = tl.load(p_g, boundary_check=(0, 1), padding_option="zero")
        b_dh = tl.load(p_dhk, boundary_check=(0, 1))
        b_gc = chunk_cumsum(b_g.to(GDOT), BT)
        b_gl = tl.sum(b_g.to(tl.float32), 0)
        b_kd = (b_k * tl.exp(b_gl[None, :] - b_gc)).to(DOT)
        b_dv += tl.dot(b_kd, b_dh.to(DOT), input_precision="ieee")
    p_A = tl.make_block_ptr(A + (bos * H + i_h) * BT, (BT, L), (1, H * BT), (0, i_t * BT), (BT, BT), (0, 1))
    p_do = tl.make_block_ptr(do + (bos * H + i_h) * V, (L, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    b_At = tl.load(p_A, boundary_check=(0, 1), padding_option="zero")  # A^T, read through transposed strides
    b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")
    b_dv += tl.dot(b_At.to(DOT), b_do.to(DOT), input_precision="ieee")
    p_dv = tl.make_block_ptr(dv + (bos * H + i_h) * V, (L, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_dqkg_bwd_kernel(q, k, v, g, do, hs, dhs, dq, dk, dg, scale, cu_seqlens, chunk_indices, chunk_offsets, T,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, GDOT: tl.constexpr,
                          SAFE: tl.constexpr, IS_VARLEN: tl.constexpr):
    """q, k, g, dq, dk, dg: [B*T, H, K]; v, do: [B*T, H, V]; hs: [slots, H, K, V]; dhs: [NC, H, K, V]."""
    # K tiles of one chunk are adjacent program ids, so they share v, do through L2
    i_k, i_c, i_h = tl.program_id(0) % tl.cdiv(K, BK), tl.program_id(0) // tl.cdiv(K, BK), tl.program_id(1)
    i_t, bos, eos, boh = chunk_bounds(i_c, cu_seqlens, chunk_indices, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    o_t = tl.arange(0, BT)
    p_vo = (bos * H + i_h) * V
    p_h = hs + ((boh + i_t) * H + i_h) * K * V
    p_dh = dhs + (i_c.to(tl.int64) * H + i_h) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        p_v = tl.make_block_ptr(v + p_vo, (L, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_do = tl.make_block_ptr(do + p_vo, (L, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        # states read transposed ([BV, BK]) so that both products below are plain row-major
        p_ht = tl.make_block_ptr(p_h, (V, K), (1, V), (i_v * BV, i_k * BK), (BV, BK), (0, 1))
        p_hnt = tl.make_block_ptr(p_h + H * K * V, (V, K), (1, V), (i_v * BV, i_k * BK), (BV, BK), (0, 1))
        p_dht = tl.make_block_ptr(p_dh, (V, K), (1, V), (i_v * BV, i_k * BK), (BV, BK), (0, 1))
        b_v = tl.load(p_v, boundary_check=(0, 1), padding_option="zero").to(DOT)
        b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero").to(DOT)
        b_ht = tl.load(p_ht, boundary_check=(0, 1))
        b_hnt = tl.load(p_hnt, boundary_check=(0, 1))
        b_dht = tl.load(p_dht, boundary_check=(0, 1))
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_dq += tl.dot(b_do, b_ht.to(DOT), input_precision="ieee")
        b_dk += tl.dot(b_v, b_dht.to(DOT), input_precision="ieee")
        b_dgl += tl.sum(b_hnt.to(tl.float32) * b_dht.to(tl.float32), 0)
    # q, k, g are loaded only now: keeping them live through the V loop costs registers
    p_qk = (bos * H + i_h) * K
    p_q = tl.make_block_ptr(q + p_qk, (L, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    p_k = tl.make_block_ptr(k + p_qk, (L, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    p_g = tl.make_block_ptr(g + p_qk, (L, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    b_g = tl.load(p_g, boundary_check=(0, 1), padding_option="zero")
    b_gc = chunk_cumsum(b_g.to(GDOT), BT)
    b_gl = tl.sum(b_g.to(tl.float32), 0)
    b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA * scale, 0.)
    b_dq = b_dq * scale * tl.exp(b_gc)
    b_dk = b_dk * tl.exp(b_gl[None, :] - b_gc)
    if tl.min(b_gc) >= -SAFE:
        b_eg = tl.exp(b_gc)
        b_qg = (b_q * b_eg).to(DOT)
        b_kg = (b_k * tl.exp(-b_gc)).to(DOT)
        b_dAd = b_dA.to(DOT)
        b_dq += tl.dot(b_dAd, b_kg, input_precision="ieee") * b_eg
        b_dk += tl.dot(tl.trans(b_dAd), b_qg, input_precision="ieee") * tl.exp(-b_gc)
    else:
        b_dq, b_dk = dqk_logspace(b_dq, b_dk, b_dA, b_q, b_k, b_gc, BT)
    b_dg = tl.cumsum(b_q * b_dq - b_k * b_dk, 0, reverse=True) + b_dgl[None, :]
    p_dq = tl.make_block_ptr(dq + p_qk, (L, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    p_dk = tl.make_block_ptr(dk + p_qk, (L, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    p_dg = tl.make_block_ptr(dg + p_qk, (L, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), boundary_check=(0, 1))
    tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), boundary_check=(0, 1))
    tl.store(p_dg, b_dg.to(p_dg.dtype.element_ty), boundary_check=(0, 1))


def chunk_bwd(q, k, v, g, do, A, hs, dhs, scale: float, meta: ChunkMeta):
    """All inputs [B, T, H, *] contiguous; A, hs from the forward, dhs from ``chunk_state_bwd``.
    Returns dq, dk, dv, dg in the dtypes of q, k, v, g."""
    B, T, H, K = q.shape
    V = v.shape[3]
    DOT, GDOT = dot_dtype(q.dtype), gate_dtype(g.dtype)
    dv = torch.empty_like(v)
    c = config("dv", K, V)
    chunk_dv_bwd_kernel[(meta.NC * triton.cdiv(V, c["BV"]), H)](
        k, g, do, A, dhs, dv, meta.cu_seqlens, meta.chunk_indices, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT=DOT, GDOT=GDOT, IS_VARLEN=meta.varlen, num_stages=2, **c)
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g)
    c = config("dqkg", K, V)
    # Square tiles: with BV != BK, Triton 3.6 miscompiles this kernel's bf16 products on the H200 whenever the V loop
    # is not software-pipelined (one V tile, e.g. K=16/V=32, K=V=64): dq, dk, dg came out wrong or NaN, or the launch
    # faulted. BK = BV = 32 costs < 1% at K=V=128 (benchmarks/NOTES.md).
    c["BK"] = c["BV"] = min(c["BK"], c["BV"])
    chunk_dqkg_bwd_kernel[(meta.NC * triton.cdiv(K, c["BK"]), H)](
        q, k, v, g, do, hs, dhs, dq, dk, dg, scale, meta.cu_seqlens, meta.chunk_indices, meta.chunk_offsets,
        meta.T, H=H, K=K, V=V, BT=BT, DOT=DOT, GDOT=GDOT, SAFE=SAFE_DECAY, IS_VARLEN=meta.varlen, num_stages=2, **c)
    return dq, dk, dv, dg
