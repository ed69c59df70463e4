"""GLA over sequences no longer than one chunk, with no initial and no final state: small models' training shape
(context 64) on a CPU, in a dozen tensor operations each way.

With G_t = g_1 + ... + g_t (per key channel) every output is one masked product (Yang et al., "Gated Linear
Attention Transformers with Hardware-Efficient Training", ICML 2024, §4.1, the parallel form of one chunk):

    o = tril((s q ⊙ e^G) (k ⊙ e^{-G})^T) v

The key factor e^{-G} is at most e^SAFE_SPAN (the caller checks the sequence's total decay), as in the chunk path's
whole-chunk factoring. Backward, with dA = tril(do v^T): dv = A^T do, d(q e^G) = dA (k e^{-G}),
d(k e^{-G}) = dA^T (q e^G), and dg is the reverse cumulative sum of dG = q̃ ⊙ dq̃ − k̃ ⊙ dk̃ (q̃ = s q e^G,
k̃ = k e^{-G}). Each token's own score (the diagonal of dA) enters dG twice with opposite signs; it is left out of
dG's products rather than subtracted, so no rounding error of the size of e^{-G} terms survives the cancellation.
The reverse sum runs in float64, as in the chunk path.
"""
from __future__ import annotations

import torch

from .constants import BT, SAFE_SPAN
from .recurrent import state_dtype


def applies(q, g, initial_state, output_final_state: bool, cu_seqlens) -> bool:
    """Whether ``short_chunk_gla`` serves this call: one chunk or less, equal-length rows, no states, gates whose
    total decay over the sequence stays within SAFE_SPAN (one host read; never under torch.compile, which sees
    the chunk path's opaque operator instead)."""
    if (cu_seqlens is not None or initial_state is not None or output_final_state or not 0 < q.shape[1] <= BT
            or torch.compiler.is_compiling()):
        return False
    return bool(g.sum(1).min() >= -SAFE_SPAN)


class _ShortChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale: float):
        acc = state_dtype(q.dtype)
        qh, kh, vh = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        G = g.to(acc).transpose(1, 2).cumsum(2)
        up, down = G.exp(), (-G).exp()
        qt, kt = qh * up * scale, kh * down
        A = (qt @ kt.transpose(-1, -2)).tril()  # [B, H, T, T]
        ctx.save_for_backward(qt, kt, vh, A, up, down)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype, g.dtype)
        return (A @ vh).transpose(1, 2).to(v.dtype)

    @staticmethod
    def backward(ctx, do):
        with torch.autocast(do.device.type, enabled=False):  # the products in the saved tensors' precision
            return _ShortChunk._backward(ctx, do)

    @staticmethod
    def _backward(ctx, do):
        qt, kt, vh, A, up, down = ctx.saved_tensors
        do = do.to(vh.dtype).transpose(1, 2)
        dA = (do @ vh.transpose(-1, -2)).tril()
        dv = A.transpose(-1, -2) @ do
        own = dA.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # [B, H, T, 1]: each token's score with itself
        dA = dA.tril(-1)
        dqt, dkt = dA @ kt, dA.transpose(-1, -2) @ qt  # without the own score
        dg = (qt * dqt - kt * dkt).double().flip(2).cumsum(2).flip(2)
        dq = (dqt + own * kt) * up * ctx.scale
        dk = (dkt + own * qt) * down
        qd, kd, vd, gd = ctx.dtypes
        return (dq.transpose(1, 2).to(qd), dk.transpose(1, 2).to(kd), dv.transpose(1, 2).to(vd),
                dg.transpose(1, 2).to(gd), None)


def short_chunk_gla(q, k, v, g, scale: float):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V], T <= 64, gates as ``applies`` checks -> o [B, T, H, V] in v's
    dtype."""
    return _ShortChunk.apply(q, k, v, g, scale)
