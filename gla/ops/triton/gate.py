"""The in-chunk cumulative log-decay, computed once per call in fp32 and read by every other stage.

    gc[t] = sum of g[j] for j <= t within t's chunk          (GLA paper, Yang et al. 2024, §4.2: b_t)

Summing here, in fp32 whatever g's dtype, keeps the other kernels independent of the gate's dtype: the model's fp32
gates cost what bf16 gates cost (one extra read of 4 bytes per gate value), and no stage redoes the sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from gla.ops import G_FLOOR

from .utils import BT, ChunkMeta, cdiv, chunk_bounds, config, tile

FLOOR = tl.constexpr(G_FLOOR)  # float32 sums: the floor applied here, for free (no pass over g before)


@triton.jit
def chunk_cumsum_fwd_kernel(g, gc, cu_seqlens, chunk_indices, chunk_offsets, T,
                            H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                            IS_VARLEN: tl.constexpr):
    """g: [B*T, H, K] any float dtype; gc: [B*T, H, K] fp32."""
    i_k, i_c, i_h = tl.program_id(0) % tl.cdiv(K, BK), tl.program_id(0) // tl.cdiv(K, BK), tl.program_id(1)
    i_t, bos, eos, _ = chunk_bounds(i_c, cu_seqlens, chunk_indices, chunk_offsets, T, BT, IS_VARLEN)
    L = (eos - bos).to(tl.int32)
    o_x = (bos * H + i_h) * K
    p_g, m = tile(g + o_x, i_t * BT, L, i_k * BK, K, H * K, 1, BT, BK)
    p_gc, _ = tile(gc + o_x, i_t * BT, L, i_k * BK, K, H * K, 1, BT, BK)
    b_g = tl.maximum(tl.load(p_g, mask=m, other=0.).to(tl.float32), FLOOR, propagate_nan=tl.PropagateNan.ALL)
    tl.store(p_gc, tl.cumsum(b_g, 0), mask=m)


def chunk_cumsum(g, meta: ChunkMeta):
    """g: [B, T, H, K] -> gc [B, T, H, K] fp32, the cumulative sum of g within each chunk."""
    H, K = g.shape[2], g.shape[3]
    gc = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    c = config("cumsum", K, 0)
    wrap_triton(chunk_cumsum_fwd_kernel)[(meta.NC * cdiv(K, c["BK"]), H)](
        g, gc, meta.cu_seqlens, meta.chunk_indices, meta.chunk_offsets, meta.T,
        H=H, K=K, BT=BT, IS_VARLEN=meta.varlen, **c)
    return gc
