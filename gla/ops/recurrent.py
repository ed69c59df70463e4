"""Step-by-step GLA recurrence: the ground truth every fast path is tested against, and the decode update.

Per head, with state S in R^{K x V} and log forget gate g_t <= 0 (Yang et al., "Gated Linear Attention
Transformers with Hardware-Efficient Training", ICML 2024, eq. 3 / §4):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

The state is kept in float32 (float64 when the inputs are float64, for gradcheck). Gradients come from autograd
through the loop, which is exact but slow: use ``backend="chunk"`` for anything but tests and decoding.
"""
from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a given input dtype: float64 stays float64, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def recurrent_step(q, k, v, g, state, scale: float):
    """One token of GLA for a batch of sequences.

    q, k, g: [B, H, K]; v: [B, H, V]; state: [B, H, K, V] (float32, or float64). Returns (o [B, H, V] and the new
    state [B, H, K, V], both in the state's dtype). The new state is a fresh tensor so autograd can differentiate
    through steps.
    """
    q, k, v, g = (x.to(state.dtype) for x in (q, k, v, g))
    return _write_and_read(state * g.exp().unsqueeze(-1), q, k, v, scale)


def recurrent_step_(q, k, v, g, state, scale: float):
    """``recurrent_step`` writing the new state over ``state`` (not differentiated): for decoding on fixed buffers.
    Returns o [B, H, V] in the state's dtype."""
    q, k, v, g = (x.to(state.dtype) for x in (q, k, v, g))
    return _write_and_read(state.mul_(g.exp().unsqueeze(-1)), q, k, v, scale)[0]


def _write_and_read(decayed, q, k, v, scale: float):
    """The rest of a step, shared by both so that they round alike: decayed + k^T v (in place) and its read-out."""
    state = decayed.addcmul_(k.unsqueeze(-1), v.unsqueeze(-2))
    return torch.einsum("bhk,bhkv->bhv", q * scale, state), state


def _recurrent_one(q, k, v, g, scale, state):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; state: [B, H, K, V] -> (o [B, T, H, V] accumulation dtype, state)."""
    outs = []
    for t in range(q.shape[1]):
        o_t, state = recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale)
        outs.append(o_t)
    B, T, H, _ = q.shape
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, T, H, v.shape[-1], dtype=state.dtype)
    return o, state


def recurrent_gla(q, k, v, g, scale: float, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Reference GLA over whole sequences (arguments already validated by ``gated_linear_attention``).

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [N, H, K, V] or None; cu_seqlens: [N+1] or None
    (then B == 1 and each sequence starts from its own initial state). Returns (o [B, T, H, V] in v's dtype,
    final state [N, H, K, V] in the accumulation dtype, or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = state_dtype(q.dtype)
    if cu_seqlens is None:  # equal lengths: every row steps at once (one pass per token, whatever B is)
        # a copy: with T = 0 the final state is h0 itself, and the caller's initial state must not be returned
        h0 = initial_state.to(acc, copy=True) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=acc)
        o, final = _recurrent_one(q, k, v, g, scale, h0)
        return o.to(v.dtype), (final if output_final_state else None)
    offs = cu_seqlens.tolist()
    bounds = [(0, offs[n], offs[n + 1]) for n in range(len(offs) - 1)]
    N = len(bounds)
    if initial_state is None:
        initial_state = q.new_zeros(N, H, K, V, dtype=acc)
    outs, finals = [], []
    for n, (b, bos, eos) in enumerate(bounds):
        sl = slice(bos, eos)
        o_n, s_n = _recurrent_one(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], g[b:b + 1, sl], scale,
                                  initial_state[n:n + 1].to(acc))
        outs.append(o_n)
        finals.append(s_n)
    o = torch.cat(outs, 1).to(v.dtype)
    final = torch.cat(finals, 0) if output_final_state else None
    return o, final
