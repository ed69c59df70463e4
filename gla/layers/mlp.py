"""Feed-forward blocks: SwiGLU (Shazeer 2020; the GLA paper's default) and the classic GELU MLP."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from gla.ops import cpu_kernels

from .fused import joint_matmul


class MLP(nn.Module):
    """x: [..., d_model] -> [..., d_model].

    kind "swiglu": down(silu(gate(x)) * up(x)); kind "gelu": down(gelu(up(x))). Parameter names follow FLA's
    GatedMLP (gate_proj, up_proj, down_proj) so checkpoints map one to one.
    """

    def __init__(self, d_model: int, d_ff: int, kind: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu', 'gelu' or 'none', got {kind!r}")
        self.kind = kind
        if kind == "swiglu":
            self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    fused = None  # a FusedLinear of input_linears() while decoding (gla.layers.fused)

    def input_linears(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj] if self.kind == "swiglu" else [self.up_proj]

    def forward(self, x):
        if self.kind == "swiglu":
            y = joint_matmul(self, x, self.input_linears())
            if y is not None and cpu_kernels.trains_eagerly(y):  # one pass each way, no split to concatenate back
                h = cpu_kernels.swiglu(y)
            else:
                gate, up = y.chunk(2, -1) if y is not None else (self.gate_proj(x), self.up_proj(x))
                h = F.silu(gate) * up
        else:
            h = F.gelu(self.up_proj(x))
        return self.dropout(self.down_proj(h))
