"""The kernels of a fused GLA decoding step: a few rows (one per sequence) through a whole layer in five launches.

A decoding step at batch 1 is a chain of matrix-vector products, each bound by a fixed cost per kernel as much as by
its bytes (benchmarks/NOTES.md: a 2-6 MB weight took 3-6 us in any kernel, cuBLAS's or Inductor's). Two things here
cut that cost:
- each program holds its whole slice of the weight ([BN, K], K at most a few thousand) in registers, loaded in one
  go: many loads in flight per SM, no loop;
- the loads that do not depend on the previous kernel (weights, norm weights, a GLA layer's own state) are issued
  before ``griddepcontrol.wait``: under programmatic dependent launch (Hopper) a kernel starts while its predecessor
  finishes, and its weights stream in the meantime.
The norms, the output gate, SwiGLU and the residual adds ride on the matrix products as prologues and epilogues, with
the model's roundings (each intermediate the eager model keeps in 16 bits is rounded here too).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .decode import state_slab
from .utils import cdiv, dot16, pow2


@triton.jit
def _rms_rows(x, eps, D: tl.constexpr, BK: tl.constexpr):
    """x [BK] fp32 (zeros past the real size) as BK // D groups of D, each divided by its root mean square."""
    xh = tl.reshape(x, [BK // D, D])
    rstd = tl.rsqrt(tl.sum(xh * xh, 1) / D + eps)
    return tl.reshape(xh * rstd[:, None], [BK])


@triton.jit
def row_linear_kernel(x, w, y, res, r, nw, N, K, sx, sy, sres, sr, eps,
                      M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, HD: tl.constexpr,
                      SWIGLU: tl.constexpr, RES: tl.constexpr, PDL: tl.constexpr):
    """y[m] = epilogue(pre(x[m]) @ w^T) for the M rows of x [M, K] (row stride sx); w: [N, K] contiguous ([2N, K],
    gate rows then up rows, with SWIGLU); y: [M, N] (row stride sy).
    pre: NORM 0 none; 1 RMSNorm with weight nw [K]; 2 RMSNorm per group of HD with weight nw [HD] (K a power of two,
    HD dividing it), times swish(r[m]) (r [M, K], row stride sr): GLA's normalised, gated head outputs.
    epilogue: SWIGLU silu(gate) * up; RES + res[m] (row stride sres). Rounded to y's dtype where the model rounds."""
    dt = y.dtype.element_ty
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    m_n, m_k = o_n < N, o_k < K
    m_w = m_n[:, None] & m_k[None, :]
    p_w = w + o_n[:, None].to(tl.int64) * K + o_k[None, :]
    b_w = tl.load(p_w, mask=m_w, other=0.)
    if SWIGLU:
        b_u = tl.load(p_w + N * K, mask=m_w, other=0.)
    if NORM == 1:
        b_nw = tl.load(nw + o_k, mask=m_k, other=0.).to(tl.float32)
    if NORM == 2:
        b_nw = tl.load(nw + o_k % HD, mask=m_k, other=0.).to(tl.float32)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    for m in tl.static_range(M):
        b_x = tl.load(x + m * sx + o_k, mask=m_k, other=0.).to(tl.float32)
        if NORM == 1:
            b_x = (b_x * tl.rsqrt(tl.sum(b_x * b_x) / K + eps) * b_nw).to(dt).to(tl.float32)
        if NORM == 2:
            b_x = (_rms_rows(b_x, eps, HD, BK) * b_nw).to(dt).to(tl.float32)
            b_r = tl.load(r + m * sr + o_k, mask=m_k, other=0.).to(tl.float32)
            b_x = (b_x * (b_r * tl.sigmoid(b_r)).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        acc = tl.sum(b_w.to(tl.float32) * b_x[None, :], 1)
        if SWIGLU:
            g = acc.to(dt).to(tl.float32)
            u = tl.sum(b_u.to(tl.float32) * b_x[None, :], 1).to(dt).to(tl.float32)
            acc = (g * tl.sigmoid(g)).to(dt).to(tl.float32) * u
        if RES:
            acc = acc.to(dt).to(tl.float32) + tl.load(res + m * sres + o_n, mask=m_n, other=0.).to(tl.float32)
        tl.store(y + m * sy + o_n, acc.to(dt), mask=m_n)


@triton.jit
def _dot_t(x, w, acc, F32: tl.constexpr):
    """acc + x @ w^T. F32 (``dot16(w.dtype) != 1``): exact fp32 products of the operands' values, for fp32 weights
    (tensor cores would round them to tf32) and for 16-bit ones under the interpreter (it cannot multiply bf16
    blocks); bf16 and fp16 are exact in fp32, so these are the GPU's products."""
    if F32:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def rows_mma_kernel(x, w, y, res, r, nw, M, N, K, sx, sy, sres, sr, eps,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ONE: tl.constexpr, NORM: tl.constexpr,
                    HD: tl.constexpr, SWIGLU: tl.constexpr, RES: tl.constexpr, PDL: tl.constexpr, F32: tl.constexpr,
                    PIPELINED: tl.constexpr):
    """row_linear_kernel for more rows: a [BM, BN] tile of y per program on tensor cores. K is taken in BK steps
    (ONE: a single step, K <= BK). Two ways to stream them: by hand (the first step's weights loaded before the PDL
    wait, each next step's during the current one; launched with num_stages 1), or PIPELINED, each step's loads in
    the loop for Triton's software pipelining to run ahead (num_stages > 1; nothing before the wait). With NORM 2,
    BK is a multiple of HD (whole head groups per step). Same arguments, prologues, epilogues and roundings as
    row_linear_kernel; F32: see _dot_t."""
    dt = y.dtype.element_ty
    # row tiles vary fastest: the programs that share a weight tile run side by side and find it in L2
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    m_n, m_m = o_n < N, o_m < M
    p_w = w + o_n[:, None].to(tl.int64) * K + o_k[None, :]
    p_x = x + o_m[:, None].to(tl.int64) * sx + o_k[None, :]
    if not PIPELINED:  # the first step's weights (all of them when ONE) stream in while the previous kernel ends
        b_w = tl.load(p_w, mask=m_n[:, None] & (o_k < K)[None, :], other=0.)
        if SWIGLU:
            b_u = tl.load(p_w + N * K, mask=m_n[:, None] & (o_k < K)[None, :], other=0.)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    if NORM == 1 and not ONE:  # the root mean square over all of K first
        ss = tl.zeros([BM], tl.float32)
        for k0 in range(0, K, BK):
            b_x = tl.load(p_x + k0, mask=m_m[:, None] & (k0 + o_k < K)[None, :], other=0.).to(tl.float32)
            ss += tl.sum(b_x * b_x, 1)
        rstd = tl.rsqrt(ss / K + eps)
    acc = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        m_k = k0 + o_k < K
        if PIPELINED:
            b_w = tl.load(p_w + k0, mask=m_n[:, None] & m_k[None, :], other=0.)
            if SWIGLU:
                b_u = tl.load(p_w + N * K + k0, mask=m_n[:, None] & m_k[None, :], other=0.)
        b_x = tl.load(p_x + k0, mask=m_m[:, None] & m_k[None, :], other=0.).to(tl.float32)
        if NORM == 1:
            if ONE:
                rstd = tl.rsqrt(tl.sum(b_x * b_x, 1) / K + eps)
            b_x = b_x * rstd[:, None] * tl.load(nw + k0 + o_k, mask=m_k, other=0.).to(tl.float32)[None, :]
        if NORM == 2:
            xh = tl.reshape(b_x, [BM, BK // HD, HD])
            xh = xh * tl.rsqrt(tl.sum(xh * xh, 2) / HD + eps)[:, :, None]
            b_nw = tl.load(nw + o_k % HD).to(tl.float32)
            b_x = (tl.reshape(xh, [BM, BK]) * b_nw[None, :]).to(dt).to(tl.float32)
            b_r = tl.load(r + o_m[:, None].to(tl.int64) * sr + k0 + o_k[None, :], mask=m_m[:, None] & m_k[None, :],
                          other=0.).to(tl.float32)
            # past K, whole groups of zeros: with eps 0 their rsqrt is inf and 0 * inf a NaN that the products
            # would carry into every row (zero weights do not cancel it)
            b_x = tl.where(m_k[None, :], b_x * (b_r * tl.sigmoid(b_r)).to(dt).to(tl.float32), 0.)
        b_x = b_x.to(dt)
        acc = _dot_t(b_x, b_w, acc, F32)
        if SWIGLU:
            acc_u = _dot_t(b_x, b_u, acc_u, F32)
        if not ONE and not PIPELINED:
            m_next = m_n[:, None] & (k0 + BK + o_k < K)[None, :]
            b_w = tl.load(p_w + k0 + BK, mask=m_next, other=0.)
            if SWIGLU:
                b_u = tl.load(p_w + N * K + k0 + BK, mask=m_next, other=0.)
    if SWIGLU:
        g = acc.to(dt).to(tl.float32)
        acc = (g * tl.sigmoid(g)).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)
    m_y = m_m[:, None] & m_n[None, :]
    if RES:
        acc = acc.to(dt).to(tl.float32) + tl.load(res + o_m[:, None].to(tl.int64) * sres + o_n[None, :], mask=m_y,
                                                  other=0.).to(tl.float32)
    tl.store(y + o_m[:, None].to(tl.int64) * sy + o_n[None, :], acc.to(dt), mask=m_y)


@triton.jit
def gated_step_kernel(p, w2, b2, s, o, sp, so, scale, normalizer, H, R, OFF_K, OFF_V, OFF_G,
                      K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr,
                      PDL: tl.constexpr):
    """One GLA token per row with the forget gate computed in place. p: [B, *] the layer's joint projection rows
    (row stride sp): q [H*K] at 0, k at OFF_K, v [H*V] at OFF_V, the gate's rank-R activations at OFF_G; w2 [H*K, R],
    b2 [H*K]: the gate's second projection; s: [B*H, K, V] fp32, updated in place; o: [B, H*V] (row stride so).
    g = logsigmoid(round(a w2^T + b2)) / normalizer (GLA paper §4.4), S' = diag(exp(g)) S + k^T v, o = scale q S'."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_r = tl.arange(0, BR)
    m_k, m_v, m_r = o_k < K, o_v < V, o_r < R
    b_w2 = tl.load(w2 + (i_h * K + o_k)[:, None] * R + o_r[None, :], mask=m_k[:, None] & m_r[None, :], other=0.)
    b_b2 = tl.load(b2 + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32)
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    # this layer's own state, written only by this kernel in the previous token's step. Safe to read before the
    # wait because each step starts with ordinary launches (FusedStep's embedding gather; the state's own resets
    # are ordinary copies): no kernel of the previous step can still be running.
    b_s = tl.load(s + p_s, mask=m_kv, other=0.)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = p + i_b * sp
    b_a = tl.load(row + OFF_G + o_r, mask=m_r, other=0.).to(tl.float32)
    b_g = (tl.sum(b_w2.to(tl.float32) * b_a[None, :], 1) + b_b2).to(p.dtype.element_ty).to(tl.float32)
    b_g = (tl.minimum(b_g, 0.) - tl.log(1 + tl.exp(-tl.abs(b_g)))) / normalizer
    b_q = tl.load(row + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32) * scale
    b_k = tl.load(row + OFF_K + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(row + OFF_V + i_h * V + o_v, mask=m_v, other=0.).to(tl.float32)
    b_s = b_s * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
    tl.store(s + p_s, b_s, mask=m_kv)
    tl.store(o + i_b * so + i_h * V + o_v, tl.sum(b_s * b_q[:, None], 0).to(o.dtype.element_ty), mask=m_v)


TILE = 4096  # weight elements a program holds: ~32-64 registers per thread at 4-8 warps (bf16)
MIN_PROGRAMS = 512  # ~4 per SM of an H100: fewer, larger programs left SMs idle at 1024 x 1024


MMA_K = 1024  # the longest step along K of rows_mma_kernel
MMA_SMEM = 192 * 1024  # its operands' shared memory per program (an H100 block may have 227 KiB)
MMA_STAGES = 1  # num_stages of rows_mma_kernel: 1 streams K by hand; more, PIPELINED (Triton's pipelining), each
# stage a copy of the operands in shared memory (three copies asked for 228 KiB: NOTES, nineteenth session)
ROWS_UNROLLED = 1  # up to this many rows each program unrolls them over its weights held in registers: at 16
# rows (H100, gla-340m) the step took 3.56 ms, each row a reduction across the program (NOTES, nineteenth session)


def row_linear(x, w, y, *, res=None, r=None, nw=None, norm: int = 0, head_dim: int = 0, swiglu: bool = False,
               eps: float = 0.0, pdl: bool = False) -> None:
    """Launch row_linear_kernel (up to ROWS_UNROLLED rows) or rows_mma_kernel: y [M, N] from x [M, K] and w ([N, K],
    or [2N, K] with swiglu); see the kernels."""
    M, K = x.shape
    N = y.shape[1]
    if not x.dtype == w.dtype == y.dtype:
        raise TypeError(f"row_linear: x, w and y must share a dtype, got {x.dtype}, {w.dtype}, {y.dtype}")
    if (w.shape != (N * (2 if swiglu else 1), K) or not w.is_contiguous() or y.shape[0] != M
            or x.stride(1) != 1 or y.stride(1) != 1):
        raise ValueError(f"row_linear: x {tuple(x.shape)}, w {tuple(w.shape)}, y {tuple(y.shape)} do not fit "
                         f"y = x @ w^T{' (swiglu)' if swiglu else ''} (w contiguous, rows of x and y unit-stride)")
    dummy = y
    args = (x, w, y, dummy if res is None else res, dummy if r is None else r, dummy if nw is None else nw)
    strides = (x.stride(0), y.stride(0), 0 if res is None else res.stride(0), 0 if r is None else r.stride(0))
    flags = dict(NORM=norm, HD=head_dim or 1, SWIGLU=swiglu, RES=res is not None, PDL=pdl,
                 **({"launch_pdl": True} if pdl else {}))
    if M > ROWS_UNROLLED:
        # K in steps as long as shared memory holds (up to MMA_K): the [16, BK] rows and the [BN, BK] weights (twice
        # with swiglu) are staged there for the tensor cores; with NORM 2 a step is a multiple of the head group
        BM = 16
        BN = 32 if cdiv(N, 32) * cdiv(M, BM) >= MIN_PROGRAMS // 2 else 16
        stages = MMA_STAGES
        staged = (BM + BN * (2 if swiglu else 1)) * w.element_size() * stages
        BK = min(pow2(K), MMA_K, 1 << (MMA_SMEM // staged).bit_length() - 1)
        if norm == 2 and BK < head_dim:  # a whole head group per step, one copy of it (fits: head_v <= MMA_K)
            BK, stages = head_dim, 1
        wrap_triton(rows_mma_kernel)[(cdiv(M, BM), cdiv(N, BN))](
            *args, M, N, K, *strides, eps, BM=BM, BN=BN, BK=BK, ONE=K <= BK, F32=dot16(w.dtype) != 1,
            PIPELINED=stages > 1, num_warps=8, num_stages=stages, **flags)
        return
    BK = pow2(K, lo=1)
    BN = max(1, TILE // BK // (2 if swiglu else 1))
    while BN > 1 and cdiv(N, BN) < MIN_PROGRAMS:
        BN //= 2
    warps = 8 if BN * BK * (2 if swiglu else 1) >= TILE else 4
    wrap_triton(row_linear_kernel)[(cdiv(N, BN),)](
        *args, N, K, *strides, eps, M=M, BN=BN, BK=BK, num_warps=warps, **flags)


def gated_step(p, w2, b2, s, o, *, heads: int, head_k: int, head_v: int, offsets: tuple[int, int, int],
               scale: float, normalizer: float, pdl: bool = False) -> None:
    """Launch gated_step_kernel over s [B*H, K, V] (see the kernel); offsets: (k, v, gate) within p's rows."""
    B = p.shape[0]
    R = w2.shape[1]
    BK, BV = state_slab(head_k, head_v)
    wrap_triton(gated_step_kernel)[(B * heads, cdiv(head_v, BV))](
        p, w2, b2, s, o, p.stride(0), o.stride(0), scale, normalizer, heads, R, *offsets,
        K=head_k, V=head_v, BK=BK, BV=BV, BR=pow2(R, lo=1), PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}))
