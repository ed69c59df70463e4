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

from .utils import BT, ChunkMeta, chunk_cumsum, config, dot_dtype, gate_dtype, seq_bounds


@triton.jit
def chunk_state_fwd_kernel(k, v, g, h0, hs, ht, cu_seqlens, chunk_offsets, T,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, GDOT: tl.constexpr,
                           USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """k, g: [B*T, H, K]; v: [B*T, H, V]; h0/ht: [N, H, K, V] fp32; hs: [slots, H, K, V] (entering + final)."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, boc, boh = seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    NT = tl.cdiv(L, BT)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p_h0 = tl.make_block_ptr(h0 + i_nh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_h += tl.load(p_h0, boundary_check=(0, 1))
    # The chunk loop is latency-bound (one dependent step per chunk), so the next chunk's tiles are loaded before
    # this chunk's math: their memory latency overlaps it (past the end they are masked to zeros, unused).
    p_k = tl.make_block_ptr(k + (bos * H + i_h) * K, (L, K), (H * K, 1), (0, i_k * BK), (BT, BK), (1, 0))
    p_g = tl.make_block_ptr(g + (bos * H + i_h) * K, (L, K), (H * K, 1), (0, i_k * BK), (BT, BK), (1, 0))
    p_v = tl.make_block_ptr(v + (bos * H + i_h) * V, (L, V), (H * V, 1), (0, i_v * BV), (BT, BV), (1, 0))
    b_kn = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")
    b_gn = tl.load(p_g, boundary_check=(0, 1), padding_option="zero")
    b_vn = tl.load(p_v, boundary_check=(0, 1), padding_option="zero")
    for i_t in range(0, NT):
        p_hs = tl.make_block_ptr(hs + ((boh + i_t) * H + i_h) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV),
                                 (BK, BV), (1, 0))
        tl.store(p_hs, b_h.to(p_hs.dtype.element_ty), boundary_check=(0, 1))
        b_k, b_g, b_v = b_kn, b_gn, b_vn
        p_k, p_g, p_v = tl.advance(p_k, (BT, 0)), tl.advance(p_g, (BT, 0)), tl.advance(p_v, (BT, 0))
        b_kn = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")
        b_gn = tl.load(p_g, boundary_check=(0, 1), padding_option="zero")
        b_vn = tl.load(p_v, boundary_check=(0, 1), padding_option="zero")
        b_gc = chunk_cumsum(b_g.to(GDOT), BT)
        b_gl = tl.sum(b_g.to(tl.float32), 0)
        b_kd = (b_k * tl.exp(b_gl[None, :] - b_gc)).to(DOT)
        b_h = b_h * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_kd), b_v.to(DOT), input_precision="ieee")
    p_hs = tl.make_block_ptr(hs + ((boh + NT) * H + i_h) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV),
                             (1, 0))
    tl.store(p_hs, b_h.to(p_hs.dtype.element_ty), boundary_check=(0, 1))
    if STORE_HT:
        p_ht = tl.make_block_ptr(ht + i_nh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_ht, b_h, boundary_check=(0, 1))


@triton.jit
def chunk_state_bwd_kernel(q, g, do, dht, dh0, dhs, scale, cu_seqlens, chunk_offsets, T,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, GDOT: tl.constexpr,
                           USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr):
    """q, g: [B*T, H, K]; do: [B*T, H, V]; dht/dh0: [N, H, K, V] fp32; dhs: [NC, H, K, V], the gradient of the
    state leaving each chunk."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, boc, boh = seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    NT = tl.cdiv(L, BT)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        p_dht = tl.make_block_ptr(dht + i_nh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV),
                                  (1, 0))
        b_dh += tl.load(p_dht, boundary_check=(0, 1))
    # prefetch as in the forward, walking backwards (the load after chunk 0 re-reads chunk 0, unused)
    o_last = tl.maximum(NT - 1, 0) * BT
    p_q = tl.make_block_ptr(q + (bos * H + i_h) * K, (L, K), (H * K, 1), (o_last, i_k * BK), (BT, BK), (1, 0))
    p_g = tl.make_block_ptr(g + (bos * H + i_h) * K, (L, K), (H * K, 1), (o_last, i_k * BK), (BT, BK), (1, 0))
    p_do = tl.make_block_ptr(do + (bos * H + i_h) * V, (L, V), (H * V, 1), (o_last, i_v * BV), (BT, BV), (1, 0))
    b_qn = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")
    b_gn = tl.load(p_g, boundary_check=(0, 1), padding_option="zero")
    b_don = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        p_dhs = tl.make_block_ptr(dhs + ((boc + i_t) * H + i_h) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV),
                                  (BK, BV), (1, 0))
        tl.store(p_dhs, b_dh.to(p_dhs.dtype.element_ty), boundary_check=(0, 1))
        b_q, b_g, b_do = b_qn, b_gn, b_don
        step = tl.where(i_t > 0, -BT, 0)
        p_q, p_g, p_do = tl.advance(p_q, (step, 0)), tl.advance(p_g, (step, 0)), tl.advance(p_do, (step, 0))
        b_qn = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")
        b_gn = tl.load(p_g, boundary_check=(0, 1), padding_option="zero")
        b_don = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")
        b_gc = chunk_cumsum(b_g.to(GDOT), BT)
        b_gl = tl.sum(b_g.to(tl.float32), 0)
        b_qd = (b_q.to(tl.float32) * scale * tl.exp(b_gc)).to(DOT)
        b_dh = b_dh * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_qd), b_do.to(DOT), input_precision="ieee")
    if STORE_DH0:
        p_dh0 = tl.make_block_ptr(dh0 + i_nh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV),
                                  (1, 0))
        tl.store(p_dh0, b_dh, boundary_check=(0, 1))


def _state_config(N: int, H: int, K: int, V: int) -> dict:
    """Tile of the state per program. These kernels are sequential over chunks, so parallelism comes only from
    N * H * tiles: take the largest tile that still gives at least 4 programs per SM (132 SMs on the H200); two fit
    on an SM at once, so each SM interleaves several chunk loops and hides their memory latency."""
    for name in ("state", "state_mid"):
        c = config(name, K, V)
        if N * H * triton.cdiv(K, c["BK"]) * triton.cdiv(V, c["BV"]) >= 4 * 132:
            return c
    return config("state_small", K, V)


def chunk_state_fwd(k, v, g, h0, meta: ChunkMeta, output_final_state: bool):
    """k, g: [B, T, H, K]; v: [B, T, H, V]; h0: [N, H, K, V] fp32 or None.
    Returns hs [slots, H, K, V] (state entering each chunk, then each final state) and ht [N, H, K, V] or None."""
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    hs = k.new_empty(meta.n_slots, H, K, V, dtype=torch.float32)
    ht = k.new_empty(meta.N, H, K, V, dtype=torch.float32) if output_final_state else None
    c = _state_config(meta.N, H, K, V)
    grid = (meta.N * H, triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"]))
    chunk_state_fwd_kernel[grid](
        k, v, g, h0, hs, ht, meta.cu_seqlens, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT=dot_dtype(k.dtype), GDOT=gate_dtype(g.dtype),
        USE_H0=h0 is not None, STORE_HT=output_final_state, IS_VARLEN=meta.varlen, num_stages=2, **c)
    return hs, ht


def chunk_state_bwd(q, g, do, dht, scale: float, meta: ChunkMeta, need_dh0: bool):
    """Returns dhs [NC, H, K, V] (gradient of the state leaving each chunk) and dh0 [N, H, K, V] fp32 or None."""
    H, K, V = q.shape[2], q.shape[3], do.shape[3]
    dhs = q.new_empty(meta.NC, H, K, V, dtype=torch.float32)
    dh0 = q.new_empty(meta.N, H, K, V, dtype=torch.float32) if need_dh0 else None
    c = _state_config(meta.N, H, K, V)
    grid = (meta.N * H, triton.cdiv(K, c["BK"]), triton.cdiv(V, c["BV"]))
    chunk_state_bwd_kernel[grid](
        q, g, do, dht, dh0, dhs, scale, meta.cu_seqlens, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT=dot_dtype(q.dtype), GDOT=gate_dtype(g.dtype),
        USE_DHT=dht is not None, STORE_DH0=need_dh0, IS_VARLEN=meta.varlen, num_stages=2, **c)
    return dhs, dh0
