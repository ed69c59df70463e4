"""The in-chunk cumulative log-decay, summed in fp32 inside every stage that needs it:

    gc[t] = sum of g[j] for j <= t within t's chunk          (GLA paper, Yang et al. 2024, §4.2: b_t)
    gl    = gc at the chunk's last token                      (the chunk's total log-decay)

Each stage loads its [BT, BK] tile of g (whatever g's dtype) and sums it in registers: no stage reads a
precomputed gc. A separate pass that wrote gc read g and wrote gc (4 bytes each per fp32 gate value) before the
stages read gc again, once in the forward and once in the backward (benchmarks/NOTES.md, v7); summed here, the
model's fp32 gates cost what bf16 gates cost, plus their wider load.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import tile


@triton.jit
def gate_sums(b_g, n, BT: tl.constexpr):
    """b_g: [BT, BC] tile of g whose rows from n on are zeros (masked loads) -> gc [BT, BC] fp32 (cumulative sum
    along the rows) and gl [BC] (gc's row n - 1, taken exactly: it must equal that token's gc, so that the last
    token's factor exp(gl - gc) is 1; zeros when n <= 0)."""
    b_gc = tl.cumsum(b_g.to(tl.float32), 0)
    last = tl.minimum(n, BT) - 1
    b_gl = tl.sum(tl.where((tl.arange(0, BT) == last)[:, None], b_gc, 0.), 0)
    return b_gc, b_gl


@triton.jit
def load_gate(g, o_k, t0, L, c0, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """gc [BT, BK] and gl [BK] of the chunk starting at token t0 (of L), K columns from c0; g: [.., H, K] rows
    starting at o_k. Also returns the tile's mask."""
    p_g, m = tile(g + o_k, t0, L, c0, K, H * K, 1, BT, BK)
    b_gc, b_gl = gate_sums(tl.load(p_g, mask=m, other=0.), L - t0, BT)
    return b_gc, b_gl, m
