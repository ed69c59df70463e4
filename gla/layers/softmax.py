"""Softmax attention (SDPA) with rotary position embeddings and a KV cache, for hybrid GLA/softmax models."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import RMSNorm


@dataclass
class KVCache:
    """Keys and values seen so far: k, v [B, H_kv, L, D] (rotary already applied to k)."""
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class StaticKVCache:
    """A KV cache of fixed capacity for static decoding (gla.decoding), written in place one token per step.

    k, v: [B, H_kv, C, D] (C slots); valid: [B, C] bool, True where a slot holds a real key (prompt padding and
    unwritten slots False); length: [1] long, the next slot to write. ``valid`` and ``length`` are shared by every
    softmax layer of a model: each layer writes the same slot, and the decoder advances ``length`` once per step.
    No host sync and no shape change: the step is the same kernels at every position, so a CUDA graph replays it.
    """
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    length: torch.Tensor


def rotary(x, positions, theta: float):
    """Rotate pairs (i, i + D/2) of x [B, T, H, D] by angle position * theta^(-2i/D) (Su et al. 2021, RoFormer).

    positions: [B, T] integer positions. Computed in float32.
    """
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D // 2, device=x.device, dtype=torch.float32) * 2 / D)
    ang = positions.float().unsqueeze(-1) * inv  # [B, T, D/2]
    cos, sin = ang.cos().unsqueeze(2), ang.sin().unsqueeze(2)
    x1, x2 = x.float()[..., :D // 2], x.float()[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with RoPE and GQA. x: [B, T, d_model] -> [B, T, d_model].

    Parameter names follow FLA's Attention layer (q_proj, k_proj, v_proj, o_proj).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = False, rope_theta: float = 10000.0,
                 qk_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.num_kv_heads = n_heads, num_kv_heads or n_heads
        if n_heads % self.num_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = head_dim or d_model // n_heads
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        # per-head RMSNorm of q and k before RoPE (Qwen3's attention)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.dropout = nn.Dropout(dropout)

    fused = None  # a FusedLinear of input_linears() while decoding (gla.layers.fused)

    def input_linears(self) -> list[nn.Linear]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x, state: KVCache | StaticKVCache | None = None, positions=None, key_mask=None,
                block_mask=None):
        """x: [B, T, d_model]; state: KVCache of earlier tokens or None; positions: [B, T] rotary positions;
        key_mask: [B, L + T] bool, False for padded keys (cache included); block_mask: [T, T] bool, True where a
        query may see a key (packed documents: block-diagonal causal). Returns (y, KVCache of all keys); with a
        StaticKVCache (one token per step) the cache is written in place and returned.
        """
        B, T, _ = x.shape
        q, k, v = self.fused(x) if self.fused is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = (t.view(B, T, self.num_kv_heads, self.head_dim) for t in (k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        q, k = rotary(q, positions, self.rope_theta), rotary(k, positions, self.rope_theta)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if isinstance(state, StaticKVCache):
            return self._static_step(q, k, v, state), state
        if state is not None:
            k, v = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
        cache = KVCache(k, v)
        L = k.shape[2]
        if self.num_kv_heads != self.n_heads:
            k, v = (t.repeat_interleave(self.n_heads // self.num_kv_heads, 1) for t in (k, v))
        mask = None
        if block_mask is not None:
            mask = block_mask
        elif torch.compiler.is_exporting():  # one graph for any T and cache length: no branch on the sizes
            pos = torch.arange(L, device=x.device)
            mask = pos.unsqueeze(0) <= pos[L - T:].unsqueeze(1)  # [T, L]: causal with a cache offset
        elif key_mask is not None or 1 < T < L:
            mask = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T)  # causal with a cache offset
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
            # A fully padded query row would give NaN; let it see itself (its output is ignored anyway).
            own = torch.zeros(T, L, dtype=torch.bool, device=x.device)
            own[torch.arange(T), torch.arange(L - T, L)] = True
            mask = mask | own
        if mask is None:  # one new query sees every key; several without a cache are plainly causal
            # a branch, not is_causal=T > 1: under torch.compile with dynamic shapes T > 1 is symbolic, not a bool
            if T > 1:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dropout(self.o_proj(o.transpose(1, 2).reshape(B, T, -1))), cache

    def _static_step(self, q, k, v, cache: StaticKVCache):
        """q: [B, H, 1, D], k, v: [B, H_kv, 1, D] of one new token, written into the cache's slot ``length``; the
        query sees every valid slot (its own included). Returns y [B, 1, d_model]."""
        B, _, T, _ = q.shape
        if T != 1:
            raise ValueError(f"a static KV cache takes one token per step, got {T}")
        cache.k.index_copy_(2, cache.length, k.to(cache.k.dtype))
        cache.v.index_copy_(2, cache.length, v.to(cache.v.dtype))
        cache.valid.index_fill_(1, cache.length, True)
        o = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=cache.valid[:, None, None, :],
                                           enable_gqa=self.num_kv_heads != self.n_heads)
        return self.dropout(self.o_proj(o.transpose(1, 2).reshape(B, T, -1)))
