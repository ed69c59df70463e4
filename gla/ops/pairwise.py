"""GLA over one short block of tokens in plain tensor ops: the form that exports.

Per head, with in-block cumulative log-decay G_t = g_1 + ... + g_t (Yang et al., "Gated Linear Attention
Transformers with Hardware-Efficient Training", ICML 2024, §4.1, the parallel form within a chunk):

    o_i  = scale * ( sum_{j <= i} (q_i * exp(G_i - G_j)) . k_j  v_j  +  (q_i * exp(G_i)) S_0 )
    S_T  = diag(exp(G_T)) S_0 + sum_j (k_j * exp(G_T - G_j))^T v_j

Each pair's decay exp(G_i - G_j) is formed from the difference of the sums, so every exponent is <= 0 (g <= 0):
exact for any gate strength, with no rescaling, no data-dependent branch and no custom operator, which is what
``torch.export`` / ONNX need. The cost is a [T, T, K] tensor per head, so it serves short blocks (decoding, prefill
in chunks of tens of tokens), not training.
"""
from __future__ import annotations

import torch

from .recurrent import recurrent_step, state_dtype


def pairwise_gla(q, k, v, g, scale: float, initial_state=None, output_final_state=False, cu_seqlens=None):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or None (arguments validated by
    ``gla.ops.gated_linear_attention``). Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32 or
    None)."""
    if cu_seqlens is not None:
        raise ValueError('backend="pairwise" takes equal-length rows, not packed sequences (cu_seqlens)')
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc, out_dtype = state_dtype(q.dtype), v.dtype
    s0 = initial_state.to(acc) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=acc)
    q, k, v, g = (x.to(acc) for x in (q, k, v, g))
    if T == 0:  # nothing read: the state passes through
        return v.new_empty(B, 0, H, V, dtype=out_dtype), (s0.clone() if output_final_state else None)
    if T == 1:  # eager decoding; an export traces T > 1, where the general path below serves T = 1 as well
        o, s = recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0, scale)
        return o.unsqueeze(1).to(out_dtype), (s if output_final_state else None)
    G = g.cumsum(1)  # [B, T, H, K]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = (G.unsqueeze(2) - G.unsqueeze(1)).masked_fill(~causal[None, :, :, None, None], float("-inf"))
    # products written as broadcasts and matmuls: runtimes run a three-operand einsum far slower
    A = (q.unsqueeze(2) * k.unsqueeze(1) * diff.exp()).sum(-1).permute(0, 3, 1, 2)  # [B, H, T, T]
    o = A @ v.transpose(1, 2) + (q * G.exp()).transpose(1, 2) @ s0  # [B, H, T, V]
    o = (o.transpose(1, 2) * scale).to(out_dtype)
    if not output_final_state:
        return o, None
    last = G[:, -1]  # [B, H, K]
    s = s0 * last.exp().unsqueeze(-1) + (k * (last.unsqueeze(1) - G).exp()).permute(0, 2, 3, 1) @ v.transpose(1, 2)
    return o, s
