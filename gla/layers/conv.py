"""Short causal depthwise convolution (as in FLA's ShortConvolution), safe for packed documents and decoding."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortConv(nn.Module):
    """y_t = silu(Σ_{s=0}^{W-1} w_{W-1-s} ⊙ x_{t-s}), never reaching into a previous document.

    Weight layout [C, 1, W] is nn.Conv1d's (FLA checkpoints load as is); tap W-1 is the current token.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x, cache=None, seq_start=None, seq_last=None):
        """x: [B, T, C]; cache: [B, C, W-1] previous inputs or None (zeros);
        seq_start: [T] first position of each token's document (packed input, B == 1) or None;
        seq_last: [N] last position of each packed document (-1 if empty), to return per-document caches.
        Returns (y [B, T, C], cache [B or N, C, W-1]).
        """
        B, T, C = x.shape
        W = self.kernel_size
        if cache is None:
            cache = x.new_zeros(B, C, W - 1)
        elif seq_start is not None:
            raise ValueError("a convolution cache cannot be continued with packed documents (cu_seqlens)")
        xp = torch.cat([cache.transpose(1, 2).to(x.dtype), x], 1)  # [B, T + W - 1, C]
        w = self.weight[:, 0].to(x.dtype)  # [C, W]
        y = xp[:, W - 1:] * w[:, W - 1]
        pos = torch.arange(T, device=x.device)
        for s in range(1, W):
            term = xp[:, W - 1 - s:W - 1 - s + T] * w[:, W - 1 - s]
            if seq_start is not None:
                term = term * (pos - s >= seq_start).unsqueeze(-1).to(x.dtype)
            y = y + term
        if seq_last is None:
            new_cache = xp[:, -(W - 1):].transpose(1, 2) if W > 1 else cache
        else:
            idx = seq_last.unsqueeze(1) - torch.arange(W - 2, -1, -1, device=x.device)  # [N, W-1]
            ok = (idx >= seq_start[seq_last.clamp(min=0)].unsqueeze(1)) & (seq_last >= 0).unsqueeze(1)
            new_cache = (x[0][idx.clamp(min=0)] * ok.unsqueeze(-1)).transpose(1, 2)
        return F.silu(y), new_cache
