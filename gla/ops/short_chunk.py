"""GLA over sequences no longer than one chunk, with no initial and no final state: small models' training shape
(context 64) on a CPU, in a few dozen tensor operations each way where the chunk operator takes hundreds.

With G_t = g_1 + ... + g_t (per key channel), o = tril(A) v with A_tj = s Σ_k q_tk k_jk e^{G_tk - G_jk}: the parallel
form of one chunk (Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training", ICML 2024,
§4.1). The rows are cut into n sub-chunks of S tokens (S = T when the whole sequence decays by at most SAFE_SPAN,
else S = 16, the paper's secondary chunking); rows of sub-chunk i use the anchor r_i = G at the end of sub-chunk
i - 1 (r_0 = 0):

    A_tj = (s q_t ⊙ e^{G_t - r_i}) · (k_j ⊙ e^{r_i - G_j})    for j < the end of sub-chunk i

The query factor is <= 1; the key factor is <= 1 for earlier sub-chunks and at most e^{span of sub-chunk i} <=
e^SAFE_SPAN inside it (``plan`` checks the span). Backward, with dA = tril(do v^T): dv = A^T do, dq̃ = dA k̃,
dk̃ = dA^T q̃, and dg is the reverse cumulative sum of dG = q̃ ⊙ dq̃ − Σ_i k̃_i ⊙ dk̃_i (the anchors cancel
exactly and carry no gradient). Each token's own score enters dG twice with opposite signs; it is left out of dG's
products rather than subtracted, so no rounding error of the size of the e^{-G} factors survives the
cancellation. The reverse sum runs in float64, as in the chunk path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import BC, BT, SAFE_SPAN
from .recurrent import state_dtype


def plan(q, g, initial_state, output_final_state: bool, cu_seqlens) -> int | None:
    """The sub-chunk length for ``short_chunk_gla`` (the whole sequence, or BC tokens), or None where it does not
    serve the call: longer than one chunk, packed rows, states, a BC-token stretch decaying by more than SAFE_SPAN,
    or under torch.compile (which sees the chunk path's opaque operator instead). One host read of the gates."""
    B, T = q.shape[:2]
    if (cu_seqlens is not None or initial_state is not None or output_final_state or not 0 < T <= BT or B == 0
            or torch.compiler.is_compiling()):
        return None
    g = g.detach()
    if bool(g.sum(1).min() >= -SAFE_SPAN):
        return T
    Tp = -(-T // BC) * BC
    per_block = F.pad(g, (0, 0, 0, 0, 0, Tp - T)).view(B, Tp // BC, BC, *g.shape[2:]).sum(2)
    return BC if bool(per_block.min() >= -SAFE_SPAN) else None


def _blocks(x, n: int):
    """[B, H, Tp, D] -> [B, H, n, Tp / n, D]."""
    B, H, Tp, D = x.shape
    return x.view(B, H, n, Tp // n, D)


def _own(x, n: int):
    """[B, H, n, Tp, D] -> [B, H, Tp, D]: row t of block i(t), the block whose anchor t's own score uses."""
    B, H, _, Tp, D = x.shape
    return torch.diagonal(x.view(B, H, n, n, Tp // n, D), dim1=2, dim2=3).permute(0, 1, 4, 2, 3).reshape(B, H, Tp, D)


class _ShortChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale: float, S: int):
        T = q.shape[1]
        Tp = -(-T // S) * S
        n = Tp // S
        acc = state_dtype(q.dtype)
        qh, kh, vh, gh = (F.pad(x.to(acc), (0, 0, 0, 0, 0, Tp - T)).transpose(1, 2) for x in (q, k, v, g))
        G = gh.cumsum(2)  # [B, H, Tp, K]
        if n == 1:
            up, keys = G.exp(), (-G).exp().unsqueeze(2)  # [B, H, Tp, K], [B, H, 1, Tp, K]
        else:
            r = F.pad(G[:, :, S - 1:-1:S], (0, 0, 1, 0)).unsqueeze(3)  # [B, H, n, 1, K]
            up = (_blocks(G, n) - r).exp().flatten(2, 3)
            reach = torch.arange(Tp, device=q.device) < (torch.arange(1, n + 1, device=q.device) * S).unsqueeze(1)
            keys = torch.where(reach[:, :, None], r - G.unsqueeze(2), float("-inf")).exp()  # [B, H, n, Tp, K]
        qt, kt = qh * up * scale, kh.unsqueeze(2) * keys
        A = (_blocks(qt, n) @ kt.transpose(-1, -2)).flatten(2, 3).tril_()  # [B, H, Tp, Tp]
        ctx.save_for_backward(qt, kt, vh, A, up, keys)
        ctx.meta = (scale, n, T, (q.dtype, k.dtype, v.dtype, g.dtype))
        return (A @ vh)[:, :, :T].transpose(1, 2).to(v.dtype)

    @staticmethod
    def backward(ctx, do):
        with torch.autocast(do.device.type, enabled=False):  # the products in the saved tensors' precision
            return _ShortChunk._backward(ctx, do)

    @staticmethod
    def _backward(ctx, do):
        qt, kt, vh, A, up, keys = ctx.saved_tensors
        scale, n, T, (qd, kd, vd, gd) = ctx.meta
        Tp = vh.shape[2]
        do = F.pad(do.to(vh.dtype), (0, 0, 0, 0, 0, Tp - T)).transpose(1, 2)
        dA = do @ vh.transpose(-1, -2)
        dv = A.transpose(-1, -2) @ do
        own = dA.diagonal(dim1=-2, dim2=-1).unsqueeze(-1).clone()  # [B, H, Tp, 1]: each token's score with itself
        dA = _blocks(dA.tril_(-1), n)  # [B, H, n, S, Tp], without the own scores
        dqt = (dA @ kt).flatten(2, 3)  # [B, H, Tp, K]
        dkt = dA.transpose(-1, -2) @ _blocks(qt, n)  # [B, H, n, Tp, K]
        dg = (qt * dqt - (kt * dkt).sum(2)).double().flip(2).cumsum(2).flip(2)
        own_keys = _own(kt, n) if n > 1 else kt[:, :, 0]
        dq = (dqt + own * own_keys) * up * scale
        dk = (dkt * keys).sum(2) + own * qt * (_own(keys, n) if n > 1 else keys[:, :, 0])
        return tuple(x[:, :, :T].transpose(1, 2).to(dt) for x, dt in ((dq, qd), (dk, kd), (dv, vd), (dg, gd))) \
            + (None, None)


def short_chunk_gla(q, k, v, g, scale: float, S: int):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; S from ``plan`` -> o [B, T, H, V] in v's dtype."""
    return _ShortChunk.apply(q, k, v, g, scale, S)
