"""Inter-chunk state passing, forward (states entering each chunk) and backward (their gradients).

GLA paper (Yang et al. 2024), §4.2 chunkwise form. Per head, chunk of tokens with cumulative log-decay gc (from the
chunk start) and total decay gl = gc[last]; S is the state entering the chunk:

    forward:   S' = diag(exp(gl)) S + (k * exp(gl - gc))^T v
    backward:  dS = diag(exp(gl)) dS' + scale * (q * exp(gc))^T do

Every exponent is <= 0 because g <= 0, so no rescaling is needed here. These kernels walk the chunks of one
sequence in order (a [BK, BV] tile of the state per program, held in registers in fp32); all else is parallel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import BT, ChunkMeta, config, dot_dtype, seq_bounds, store_dtype


@triton.jit
def chunk_state_fwd_kernel(k, v, g, h0, hs, ht, cu_seqlens, chunk_offsets, T,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr,
                           USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """k, g: [B*T, H, K]; v: [B*T, H, V]; h0/ht: [N, H, K, V] fp32; hs: [slots, H, K, V] (entering + final)."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, boc, boh = seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    NT = tl.cdiv(eos - bos, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.)
    p_hs = hs + (boh * H + i_h) * K * V + o_kv
    for i_t in range(0, NT):
        tl.store(p_hs + i_t * H * K * V, b_h.to(hs.dtype.element_ty), mask=m_kv)
        rows = bos + i_t * BT + o_t
        m_t = rows < eos
        p_k = (rows[:, None] * H + i_h) * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m_t[:, None] & m_k[None, :], other=0.)
        b_g = tl.load(g + p_k, mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32)
        b_v = tl.load(v + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_gc = tl.cumsum(b_g, 0)
        b_gl = tl.sum(b_g, 0)
        b_kd = (b_k * tl.exp(b_gl[None, :] - b_gc)).to(DOT)
        b_h = b_h * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_kd), b_v.to(DOT), input_precision="ieee")
    tl.store(p_hs + NT * H * K * V, b_h.to(hs.dtype.element_ty), mask=m_kv)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.jit
def chunk_state_bwd_kernel(q, g, do, dht, dh0, dhs, scale, cu_seqlens, chunk_offsets, T,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr,
                           USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr):
    """q, g: [B*T, H, K]; do: [B*T, H, V]; dht/dh0: [N, H, K, V] fp32; dhs: [NC, H, K, V], the gradient of the
    state leaving each chunk."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, boc, boh = seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    NT = tl.cdiv(eos - bos, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.)
    p_dhs = dhs + (boc * H + i_h) * K * V + o_kv
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        tl.store(p_dhs + i_t * H * K * V, b_dh.to(dhs.dtype.element_ty), mask=m_kv)
        rows = bos + i_t * BT + o_t
        m_t = rows < eos
        p_q = (rows[:, None] * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p_q, mask=m_t[:, None] & m_k[None, :], other=0.)
        b_g = tl.load(g + p_q, mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32)
        b_do = tl.load(do + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.)
        b_gc = tl.cumsum(b_g, 0)
        b_gl = tl.sum(b_g, 0)
        b_qd = (b_q.to(tl.float32) * scale * tl.exp(b_gc)).to(DOT)
        b_dh = b_dh * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_qd), b_do.to(DOT), input_precision="ieee")
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_kv, b_dh, mask=m_kv)


def _state_config(N: int, H: int, K: int, V: int) -> dict:
    """Tile of the state per program. These kernels are sequential over chunks, so parallelism comes only from
    N * H * tiles: use the small tiles when the large ones would give fewer than ~4 programs per SM (132 SMs)."""
    c = config("state", K, V)
    if N * H * triton.cdiv(K, c["BK"]) * triton.cdiv(V, c["BV"]) < 4 * 132:
        c = config("state_small", K, V)
    return c


def chunk_state_fwd(k, v, g, h0, meta: ChunkMeta, output_final_state: bool):
    """k, g: [B, T, H, K]; v: [B, T, H, V]; h0: [N, H, K, V] fp32 or None.
    Returns hs [slots, H, K, V] (state entering each chunk, then each final state) and ht [N, H, K, V] or None."""
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    hs = k.new_empty(meta.n_slots, H, K, V, dtype=store_dtype(k.dtype))
    ht = k.new_empty(meta.N, H, K, V, dtype=torch.float32) if output_final_state else None
    c = _state_config(meta.N, H, K, V)
    grid = (meta.N * H, triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"]))
    chunk_state_fwd_kernel[grid](
        k, v, g, h0, hs, ht, meta.cu_seqlens, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT=dot_dtype(k.dtype),
        USE_H0=h0 is not None, STORE_HT=output_final_state, IS_VARLEN=meta.varlen, num_stages=2, **c)
    return hs, ht


def chunk_state_bwd(q, g, do, dht, scale: float, meta: ChunkMeta, need_dh0: bool):
    """Returns dhs [NC, H, K, V] (gradient of the state leaving each chunk) and dh0 [N, H, K, V] fp32 or None."""
    H, K, V = q.shape[2], q.shape[3], do.shape[3]
    dhs = q.new_empty(meta.NC, H, K, V, dtype=store_dtype(q.dtype))
    dh0 = q.new_empty(meta.N, H, K, V, dtype=torch.float32) if need_dh0 else None
    c = _state_config(meta.N, H, K, V)
    grid = (meta.N * H, triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"]))
    chunk_state_bwd_kernel[grid](
        q, g, do, dht, dh0, dhs, scale, meta.cu_seqlens, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT=dot_dtype(q.dtype),
        USE_DHT=dht is not None, STORE_DH0=need_dh0, IS_VARLEN=meta.varlen, num_stages=2, **c)
    return dhs, dh0
