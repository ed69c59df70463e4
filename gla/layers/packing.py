"""Per-token bookkeeping of packed documents (``cu_seqlens``), shared by the model and its layers."""
from __future__ import annotations

import torch


def packed_info(cu_seqlens: torch.Tensor, T: int, device):
    """cu_seqlens [N+1] -> (seq_start [T]: first position of each token's document, seq_last [N]: last position of
    each document (-1 if empty), positions [1, T]: each token's position inside its document). Tensor ops only."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    start = torch.repeat_interleave(cu[:-1], lens, output_size=T)
    last = torch.where(lens > 0, cu[1:] - 1, -1)
    return start, last, (torch.arange(T, device=device) - start).unsqueeze(0)
