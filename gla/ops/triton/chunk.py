"""Chunkwise GLA on the GPU: the autograd Function that chains the Triton stages.

forward:  chunk_state_fwd (states entering each chunk) -> chunk_output_fwd (o, and the intra scores A)
backward: chunk_state_bwd (gradients of the states leaving each chunk, dh0) -> chunk_bwd (dv; dq, dk, dg)
The per-chunk states (fp32) and intra-chunk scores (bf16 for bf16 inputs) are kept from the forward, so the
backward does not recompute them.
"""
from __future__ import annotations

import torch

from .. import no_autocast
from .chunk_bwd import chunk_bwd
from .chunk_output import chunk_output_fwd
from .chunk_state import chunk_state_bwd, chunk_state_fwd
from .utils import chunk_meta


class ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        meta = chunk_meta(q.shape[0], q.shape[1], cu_seqlens)
        need_grad = any(ctx.needs_input_grad[:6])
        hs, ht = chunk_state_fwd(k, v, g, h0, meta, output_final_state)
        o, A = chunk_output_fwd(q, k, v, g, hs, scale, meta, store_A=need_grad)
        ctx.save_for_backward(q, k, v, g, A, hs)
        ctx.meta, ctx.scale = meta, scale
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        with no_autocast(do.device.type):  # backward() may run under autocast
            return ChunkGLAFunction._backward(ctx, do, dht)

    @staticmethod
    def _backward(ctx, do, dht):
        q, k, v, g, A, hs = ctx.saved_tensors
        meta = ctx.meta
        do = do.contiguous()
        dht = dht.to(torch.float32).contiguous() if dht is not None else None
        dhs, dh0 = chunk_state_bwd(q, g, do, dht, ctx.scale, meta, need_dh0=ctx.h0_dtype is not None)
        dq, dk, dv, dg = chunk_bwd(q, k, v, g, do, A, hs, dhs, ctx.scale, meta)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, dg, None, dh0, None, None


def triton_gla(q, k, v, g, scale: float, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunkwise GLA with Triton kernels (arguments validated by ``gla.ops.gated_linear_attention``).

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [N, H, K, V] or None; cu_seqlens: [N+1] or None
    (then B == 1). Returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] float32 or None). Differentiable
    in q, k, v, g and initial_state, also through the final state. Inputs: fp32, bf16 or fp16 (fp32 state);
    K <= 256 and V <= 512 are the tuned range.
    """
    for name, x in (("q", q), ("g", g)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f'backend="triton" takes float32, bfloat16 or float16 {name}, got {x.dtype} '
                             '(use backend="chunk" or "recurrent" for float64)')
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if B * T == 0:  # nothing to launch: outputs are empty and every final state is the initial one
        o = v.new_zeros(B, T, H, V)
        if not output_final_state:
            return o, None
        if initial_state is None:
            return o, q.new_zeros(N, H, K, V, dtype=torch.float32)
        return o, initial_state.to(torch.float32).clone()
    return ChunkGLAFunction.apply(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
