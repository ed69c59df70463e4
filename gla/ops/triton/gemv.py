"""A linear layer over a few rows (decoding): y = x W^T (+ b), read at the speed of the GPU's memory.

At one to sixteen rows a linear layer is bound by reading its weight W [N, K] once. Each program owns BN whole rows
of W and walks K in steps of BK: with one input row it multiplies elementwise into a [BN, BK] fp32 accumulator and
sums it once at the end; with 2-16 rows (padded to 16) it accumulates a [16, BN] product on the tensor cores. Many
small programs (BN of 4-32 rows) keep every SM streaming even for a 1024 x 1024 weight, where a GEMM tiling of
64-128 rows leaves most SMs idle.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .utils import cdiv, dot16, pow2, to_dot


@triton.jit
def gemv_kernel(x, w, b, y, M, N, K, s_xm, s_wn, s_ym, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, DOT16: tl.constexpr):
    """x: [M, K] (row stride s_xm); w: [N, K] (row stride s_wn); b: [N] or unused; y: [M, N] (row stride s_ym).
    DOT16: how the tensor-core path takes its operands (utils.dot16)."""
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    o_m = tl.arange(0, BM)
    m_n, m_m = o_n < N, o_m < M
    p_w = w + o_n[:, None].to(tl.int64) * s_wn
    if BM == 1:
        acc = tl.zeros([BN, BK], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        b_w = tl.load(p_w + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.)
        b_x = tl.load(x + o_m[:, None] * s_xm + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.)
        if BM == 1:
            acc += b_w.to(tl.float32) * b_x.to(tl.float32)
        else:
            acc += tl.dot(to_dot(b_x, DOT16), tl.trans(to_dot(b_w, DOT16)), input_precision="ieee")
    if BM == 1:
        out = tl.sum(acc, 1)[None, :]
    else:
        out = acc
    if HAS_BIAS:
        out += tl.load(b + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
    tl.store(y + o_m[:, None] * s_ym + o_n[None, :], out.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


MAX_ROWS = 16


def config(M: int, N: int, K: int, sms: int = 132) -> tuple[int, int, int, int]:
    """(BM, BN, BK, warps) for x [M, K] and W [N, K]: BN rows of W per program, as many as keep at least two
    programs per SM (``sms``), within 4-32 (one row) or 16-64 (the tensor-core path)."""
    BM = 1 if M == 1 else MAX_ROWS
    lo, hi = (4, 32) if BM == 1 else (16, 64)
    BN = max(lo, min(hi, pow2(N // (2 * sms) + 1, lo=1) // 2))
    BK = min(pow2(K), 512 if BM == 1 else 128)
    return BM, BN, BK, 4


def _launch(x, weight, bias, y, cfg):
    M, K = x.shape
    N = weight.shape[0]
    BM, BN, BK, warps = cfg
    wrap_triton(gemv_kernel)[(cdiv(N, BN),)](
        x, weight, bias if bias is not None else weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK, DOT16=dot16(weight.dtype), num_warps=warps)


@triton_op("gla::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] (1 <= M <= MAX_ROWS, unit column stride), weight: [N, K] contiguous, bias: [N] or None ->
    y [M, N] in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    y = x.new_empty(M, N)
    if M and N:
        _launch(x, weight, bias, y, config(M, N, K, _sms(x.device)))
    return y


def _sms(device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any count gives the same result
    return torch.cuda.get_device_properties(device).multi_processor_count


def triton_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] with at most MAX_ROWS rows in all: y [..., N]."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_ROWS or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"triton_gemv takes x [..., K] of at most {MAX_ROWS} rows and weight [N, K], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return gemv_op(rows, weight.contiguous(), bias).view(*x.shape[:-1], weight.shape[0])
