"""One decoding step of GLA for a batch of sequences: the state is read once and written once.

    S' = diag(exp(g)) S + k^T v,    o = scale * q S'       (GLA paper, Yang et al. 2024, eq. 3)

Memory-bound: per head the fp32 state (K * V * 4 bytes) dominates; each program owns a [K, BV] column slab of one
head's state, so the whole batch is a single launch with B * H * V / BV programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .utils import cdiv, pow2


@triton.jit
def recurrent_step_fwd_kernel(q, k, v, g, s, o, s_new, scale, sq, sk, sv, sg, H,
                              K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """q, k, g: [B, H, K] and v: [B, H, V], each row's [H, *] contiguous, rows sq / sk / sg / sv elements apart (the
    slices of one fused projection's output are read where they lie); o: [B*H, V]; s, s_new: [B*H, K, V] fp32
    (s_new may be s: in place)."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(s + p_s, mask=m_kv, other=0.)
    b_q = tl.load(q + i_b * sq + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32) * scale
    b_k = tl.load(k + i_b * sk + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_g = tl.load(g + i_b * sg + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v + i_b * sv + i_h * V + o_v, mask=m_v, other=0.).to(tl.float32)
    b_s = b_s * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
    b_o = tl.sum(b_s * b_q[:, None], 0)
    tl.store(s_new + p_s, b_s, mask=m_kv)
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def _rows(x):
    """x [B, H, D] as the kernel reads it: itself when each row's [H, D] is contiguous (a slice of a wider output,
    as decoding's fused projections give), else a contiguous copy; with its row stride."""
    if x.stride(-1) != 1 or (x.shape[1] > 1 and x.stride(1) != x.shape[2]):
        x = x.contiguous()
    return x, x.stride(0)


def state_slab(K: int, V: int) -> tuple[int, int]:
    """(BK, BV): each decoding program's [K, BV] fp32 slab of one head's state, 16 KiB (registers unspilled)."""
    BK = pow2(K)
    return BK, max(16, min(pow2(V), 4096 // BK))


def _launch(q, k, v, g, s, s_new, scale: float):
    B, H, K = q.shape
    V = v.shape[-1]
    o = v.new_empty(B, H, V)
    if B * H == 0:
        return o
    BK, BV = state_slab(K, V)
    (q, sq), (k, sk), (v, sv), (g, sg) = (_rows(x) for x in (q, k, v, g))
    wrap_triton(recurrent_step_fwd_kernel)[(B * H, cdiv(V, BV))](
        q, k, v, g, s, o, s_new, scale, sq, sk, sv, sg, H, K=K, V=V, BK=BK, BV=BV, num_warps=4)
    return o


@triton_op("gla::recurrent_step_triton", mutates_args=())
def recurrent_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, g: [B, H, K]; v: [B, H, V]; state: [B, H, K, V] -> (o [B, H, V], new state [B, H, K, V] fp32)."""
    s = state.to(torch.float32).contiguous()
    s_new = torch.empty_like(s)
    return _launch(q, k, v, g, s, s_new, scale), s_new


@triton_op("gla::recurrent_step_triton_", mutates_args=("state",))
def recurrent_step_inplace_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                              state: torch.Tensor, scale: float) -> torch.Tensor:
    """As ``recurrent_step_op``, writing the new state over ``state`` (contiguous fp32); returns o."""
    return _launch(q, k, v, g, state, state, scale)


def triton_recurrent_step(q, k, v, g, state, scale: float, inplace: bool = False):
    """One GLA token for a batch: same semantics as ``gla.ops.recurrent.recurrent_step``, for generation.

    q, k, g: [B, H, K]; v: [B, H, V]; state: [B, H, K, V] float32. Returns (o [B, H, V] in v's dtype,
    new state [B, H, K, V] float32). With ``inplace=True`` the new state is written over ``state`` (which must be
    contiguous float32) and ``state`` itself is returned: no allocation, one read and one write of the state, so the
    step can be captured in a CUDA graph. Not differentiable (decoding runs under ``torch.no_grad``); use
    ``recurrent_step`` for gradients.
    """
    if inplace:
        if state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError("inplace=True needs a contiguous float32 state")
        return recurrent_step_inplace_op(q, k, v, g, state, scale), state
    return recurrent_step_op(q, k, v, g, state, scale)
