"""Chunkwise GLA on the GPU: the Triton stages chained into two ``torch.library`` operators with registered autograd.

forward  ``gla::chunk_fwd_triton``: chunk_cumsum (gc) -> chunk_state_fwd (states entering each chunk) ->
         chunk_output_fwd (o, and the intra scores A)
backward ``gla::chunk_bwd_triton``: (chunk_cumsum) -> chunk_state_bwd (gradients of the states leaving each chunk,
         dh0) -> chunk_bwd (dv; dq, dk, dg)
Both are ``triton_op``s: torch.compile sees through them to the kernels (no graph break), and nothing in them reads
a value back to the host, so they can be captured in CUDA graphs. The per-chunk states and intra-chunk scores are kept
from the forward (bf16 for 16-bit inputs, fp32 for fp32: utils.kept_dtype). The backward needs g only through gc, the
in-chunk cumsum: a call with a materialised g keeps gc in place of g (as much memory as the model's fp32 gate, and the
backward skips a pass over the gate: ~5% of forward+backward at H=16 K=V=128), also under torch.compile (gla-340m,
B=8 T=2048, compiled layers on an H100: peak 15.7 GiB and 95.8 ms per step whether gc or g is kept). A broadcast g
(fixed decay) is kept as it is, and gc recomputed from it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import register_autograd, triton_op

from .. import wants_grad
from .chunk_bwd import chunk_bwd
from .chunk_output import chunk_output_fwd
from .chunk_state import chunk_state_bwd, chunk_state_fwd
from .gate import chunk_cumsum
from .utils import chunk_meta


@triton_op("gla::chunk_fwd_triton", mutates_args=())
def chunk_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor],
                 cu_seqlens: Optional[torch.Tensor], scale: float, output_final_state: bool,
                 store_A: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; h0: [N, H, K, V] or None. Operators cannot return None, so an absent
    output is an empty tensor. Returns o [B, T, H, V], ht [N, H, K, V] fp32 (empty unless output_final_state),
    A [B, T, H, BT] (empty unless store_A), hs [slots, H, K, V] (the per-chunk states) and gc [B, T, H, K] fp32 (the
    in-chunk cumsum of g), the last three for the backward."""
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    h0 = h0.to(torch.float32).contiguous() if h0 is not None else None
    meta = chunk_meta(q.shape[0], q.shape[1], cu_seqlens)
    gc = chunk_cumsum(g, meta)
    hs, ht = chunk_state_fwd(k, v, gc, h0, meta, output_final_state)
    o, A = chunk_output_fwd(q, k, v, gc, hs, scale, meta, store_A=store_A)
    return o, ht if ht is not None else hs.new_empty(0), A if A is not None else q.new_empty(0), hs, gc


@triton_op("gla::chunk_bwd_triton", mutates_args=())
def chunk_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, do: torch.Tensor,
                 dht: Optional[torch.Tensor], A: torch.Tensor, hs: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                 scale: float, need_dh0: bool, summed: bool, g_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """g: the gate, or (summed) the forward's gc; A, hs: what the forward returned. Gradients dq, dk, dv (dtypes of
    q, k, v), dg (g_dtype) and dh0 [N, H, K, V] fp32 (empty unless need_dh0). A empty (a forward that did not expect
    a backward, store_A=False): the scores are recomputed here."""
    q, k, v, g, do = (x.contiguous() for x in (q, k, v, g, do))
    # an empty dht is the gradient of the empty placeholder that a forward without output_final_state returns
    dht = dht.to(torch.float32).contiguous() if dht is not None and dht.numel() else None
    meta = chunk_meta(q.shape[0], q.shape[1], cu_seqlens)
    gc = g if summed else chunk_cumsum(g, meta)
    if A.numel() == 0:  # a shape, not a value: no host sync
        A = chunk_output_fwd(q, k, v, gc, hs, scale, meta, store_A=True)[1]
    dhs, dh0 = chunk_state_bwd(q, gc, do, dht, scale, meta, need_dh0=need_dh0)
    dq, dk, dv, dg = chunk_bwd(q, k, v, gc, do, A, hs, dhs, scale, meta, g_dtype)
    return dq, dk, dv, dg, dh0 if dh0 is not None else hs.new_empty(0)


def _setup(ctx, inputs, output):
    q, k, v, g, h0, cu_seqlens, scale, _, _ = inputs
    _, _, A, hs, gc = output
    ctx.summed = 0 not in g.stride()  # see the module docstring
    ctx.save_for_backward(q, k, v, gc if ctx.summed else g, A, hs, cu_seqlens)
    ctx.scale = scale
    ctx.g_dtype = g.dtype
    ctx.h0_dtype = h0.dtype if h0 is not None else None  # the state's dtype, for its gradient
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dht, dA, dhs, dgc):
    q, k, v, g, A, hs, cu_seqlens = ctx.saved_tensors
    if do is None:  # only the final state was used
        do = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    need_dh0 = ctx.needs_input_grad[4]
    dq, dk, dv, dg, dh0 = chunk_bwd_op(q, k, v, g, do, dht, A, hs, cu_seqlens, ctx.scale, need_dh0, ctx.summed,
                                       ctx.g_dtype)
    dh0 = dh0.to(ctx.h0_dtype) if need_dh0 else None
    return dq, dk, dv, dg, dh0, None, None, None, None


register_autograd("gla::chunk_fwd_triton", _backward, setup_context=_setup)


def triton_gla(q, k, v, g, scale: float, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunkwise GLA with Triton kernels (arguments validated by ``gla.ops.gated_linear_attention``).

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [N, H, K, V] or None; cu_seqlens: [N+1] or None
    (then B == 1). Returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] float32 or None). Differentiable
    in q, k, v, g and initial_state, also through the final state. Inputs: fp32, bf16 or fp16 (fp32 state; g may
    differ from q's dtype, e.g. the model's fp32 gate beside bf16 q, k, v); K <= 256 and V <= 512 are the tuned range.
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
    store_A = wants_grad(q, k, v, g, initial_state)  # the scores are kept only for a backward
    o, ht, _, _, _ = chunk_fwd_op(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state, store_A)
    return o, (ht if output_final_state else None)
