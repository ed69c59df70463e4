"""Inter-chunk state passing, forward (states entering each chunk) and backward (their gradients).

GLA paper (Yang et al. 2024), §4.2 chunkwise form. Per head, chunk of tokens with cumulative log-decay gc (from the
chunk start, see gate.py) and total decay gl = gc[last]; S is the state entering the chunk:

    forward:   S' = diag(exp(gl)) S + (k * exp(gl - gc))^T v
    backward:  dS = diag(exp(gl)) dS' + scale * (q * exp(gc))^T do

Every exponent is <= 0 because g <= 0, so no rescaling is needed here. These kernels walk the chunks of one
sequence in order (a [BK, BV] tile of the state per program, held in registers in fp32); all else is parallel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .utils import BT, ChunkMeta, cdiv, config, dot16, kept_dtype, last_row, seq_bounds, tile, to_dot


@triton.jit
def load_chunk(a, gc, b, o_k, o_w, t0, L, i_k, i_w, H: tl.constexpr, K: tl.constexpr, W: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr):
    """Rows t0 .. t0+BT-1 of one head (zeros past L): [BT, BK] tiles of a and gc (K columns from i_k * BK) and the
    [BT, BW] tile of b (W columns from i_w * BW). a, gc: [.., H, K] rows starting at o_k; b: [.., H, W] at o_w."""
    p_a, m_a = tile(a + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
    p_g, _ = tile(gc + o_k, t0, L, i_k * BK, K, H * K, 1, BT, BK)
    p_b, m_b = tile(b + o_w, t0, L, i_w * BW, W, H * W, 1, BT, BW)
    return tl.load(p_a, mask=m_a, other=0.), tl.load(p_g, mask=m_a, other=0.), tl.load(p_b, mask=m_b, other=0.)


@triton.jit
def chunk_state_fwd_kernel(k, v, gc, h0, hs, ht, cu_seqlens, chunk_offsets, T,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, DOT16: tl.constexpr,
                           USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """k: [B*T, H, K]; gc: [B*T, H, K] fp32; v: [B*T, H, V]; h0/ht: [N, H, K, V] fp32; hs: [slots, H, K, V]
    (entering + final)."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, _, boh = seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    NT = tl.cdiv(L, BT)
    o_k = (bos * H + i_h) * K
    o_v = (bos * H + i_h) * V
    # offsets of this program's [BK, BV] tile inside one [K, V] state
    p_s, m_s = tile(i_h * K * V, i_k * BK, K, i_v * BV, V, V, 1, BK, BV)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_n.to(tl.int64) * H * K * V + p_s, mask=m_s, other=0.)
    # The chunk loop is latency-bound (one dependent step per chunk), so the next chunk's tiles are loaded before
    # this chunk's math: their memory latency overlaps it (past the end they are masked to zeros, unused).
    b_kn, b_gn, b_vn = load_chunk(k, gc, v, o_k, o_v, 0, L, i_k, i_v, H, K, V, BT, BK, BV)
    for i_t in range(0, NT):
        tl.store(hs + (boh + i_t) * H * K * V + p_s, to_dot(b_h, DOT16).to(hs.dtype.element_ty), mask=m_s)
        b_k, b_gc, b_v = b_kn, b_gn, b_vn
        t1 = (i_t + 1) * BT
        b_kn, b_gn, b_vn = load_chunk(k, gc, v, o_k, o_v, t1, L, i_k, i_v, H, K, V, BT, BK, BV)
        b_gl = last_row(gc + o_k, tl.minimum(t1, L), i_k * BK, K, H * K, BK)
        b_kd = to_dot(b_k * tl.exp(b_gl[None, :] - b_gc), DOT16)
        b_h = b_h * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_kd), to_dot(b_v, DOT16), input_precision="ieee")
    tl.store(hs + (boh + NT) * H * K * V + p_s, to_dot(b_h, DOT16).to(hs.dtype.element_ty), mask=m_s)
    if STORE_HT:
        tl.store(ht + i_n.to(tl.int64) * H * K * V + p_s, b_h, mask=m_s)


@triton.jit
def chunk_state_bwd_kernel(q, gc, do, dht, dh0, dhs, scale, cu_seqlens, chunk_offsets, T,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, DOT16: tl.constexpr,
                           USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr):
    """q: [B*T, H, K]; gc: [B*T, H, K] fp32; do: [B*T, H, V]; dht/dh0: [N, H, K, V] fp32; dhs: [NC, H, K, V], the
    gradient of the state leaving each chunk."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, boc, _ = seq_bounds(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    NT = tl.cdiv(L, BT)
    o_k = (bos * H + i_h) * K
    o_v = (bos * H + i_h) * V
    p_s, m_s = tile(i_h * K * V, i_k * BK, K, i_v * BV, V, V, 1, BK, BV)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_n.to(tl.int64) * H * K * V + p_s, mask=m_s, other=0.)
    # prefetch as in the forward, walking backwards (the load after chunk 0 re-reads chunk 0, unused)
    t_last = tl.maximum(NT - 1, 0) * BT
    b_qn, b_gn, b_don = load_chunk(q, gc, do, o_k, o_v, t_last, L, i_k, i_v, H, K, V, BT, BK, BV)
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        tl.store(dhs + (boc + i_t) * H * K * V + p_s, to_dot(b_dh, DOT16).to(dhs.dtype.element_ty), mask=m_s)
        b_q, b_gc, b_do = b_qn, b_gn, b_don
        b_gl = last_row(gc + o_k, tl.minimum((i_t + 1) * BT, L), i_k * BK, K, H * K, BK)
        t0 = tl.maximum(i_t - 1, 0) * BT
        b_qn, b_gn, b_don = load_chunk(q, gc, do, o_k, o_v, t0, L, i_k, i_v, H, K, V, BT, BK, BV)
        b_qd = to_dot((b_q.to(tl.float32) * scale).to(tl.float32) * tl.exp(b_gc), DOT16)
        b_dh = b_dh * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_qd), to_dot(b_do, DOT16), input_precision="ieee")
    if STORE_DH0:
        tl.store(dh0 + i_n.to(tl.int64) * H * K * V + p_s, b_dh, mask=m_s)


def _state_config(N: int, H: int, K: int, V: int) -> dict:
    """Tile of the state per program. These kernels are sequential over chunks, so parallelism comes only from
    N * H * tiles: take the largest tile that still gives every SM (132 on the H100/H200) a program. Smaller tiles
    re-read v (or do) once per K tile, and the pass is bound by those reads: on the H100, 64 x 64 tiles beat the
    smaller ones that a rule of 4 programs per SM picked, at 256 programs (GLA-340M's heads, B=8 T=2048: fwd+bwd 0.742
    vs 0.801 ms) and at 512 (H=16 K=V=128: 1.941 vs 2.028 ms), benchmarks/NOTES.md."""
    for name in ("state", "state_mid"):
        c = config(name, K, V)
        if N * H * cdiv(K, c["BK"]) * cdiv(V, c["BV"]) >= 132:
            return c
    return config("state_small", K, V)


def chunk_state_fwd(k, v, gc, h0, meta: ChunkMeta, output_final_state: bool):
    """k: [B, T, H, K]; gc: [B, T, H, K] fp32 (gate.chunk_cumsum); v: [B, T, H, V]; h0: [N, H, K, V] fp32 or None.
    Returns hs [slots, H, K, V] (state entering each chunk, then each final state) and ht [N, H, K, V] or None."""
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    # packed batches have spare slots (the chunk count is a bound), never written: zeros, so that this output of the
    # operator is deterministic (opcheck compares it across runs)
    alloc = k.new_zeros if meta.varlen else k.new_empty
    hs = alloc(meta.n_slots, H, K, V, dtype=kept_dtype(k.dtype))
    ht = k.new_empty(meta.N, H, K, V, dtype=torch.float32) if output_final_state else None
    c = _state_config(meta.N, H, K, V)
    grid = (meta.N * H, cdiv(K, c["BK"]), cdiv(V, c["BV"]))
    wrap_triton(chunk_state_fwd_kernel)[grid](
        k, v, gc, h0, hs, ht, meta.cu_seqlens, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT16=dot16(k.dtype),
        USE_H0=h0 is not None, STORE_HT=output_final_state, IS_VARLEN=meta.varlen, num_stages=2, **c)
    return hs, ht


def chunk_state_bwd(q, gc, do, dht, scale: float, meta: ChunkMeta, need_dh0: bool):
    """Returns dhs [NC, H, K, V] (gradient of the state leaving each chunk) and dh0 [N, H, K, V] fp32 or None."""
    H, K, V = q.shape[2], q.shape[3], do.shape[3]
    dhs = q.new_empty(meta.NC, H, K, V, dtype=kept_dtype(q.dtype))
    dh0 = q.new_empty(meta.N, H, K, V, dtype=torch.float32) if need_dh0 else None
    c = _state_config(meta.N, H, K, V)
    grid = (meta.N * H, cdiv(K, c["BK"]), cdiv(V, c["BV"]))
    wrap_triton(chunk_state_bwd_kernel)[grid](
        q, gc, do, dht, dh0, dhs, scale, meta.cu_seqlens, meta.chunk_offsets, meta.T,
        H=H, K=K, V=V, BT=BT, DOT16=dot16(q.dtype),
        USE_DHT=dht is not None, STORE_DH0=need_dh0, IS_VARLEN=meta.varlen, num_stages=2, **c)
    return dhs, dh0
