"""Normalisation layers. Statistics are computed in float32 whatever the input dtype (bf16 training)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gla.ops import cpu_kernels


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim (Zhang & Sennrich 2019). x: [..., D]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if (x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16 and cpu_kernels.trains_eagerly(x)):
            return cpu_kernels.rms_norm_bf16(x, self.weight, self.eps)  # the dtype the next matmul reads
        y = x.float()
        if not torch.compiler.is_exporting():  # torch's fused kernel: 0.31 against 0.44 ms fwd+bwd at [768, 128]
            return F.rms_norm(y, y.shape[-1:], self.weight.float(), self.eps).to(x.dtype)
        # a division by the root, not a product with rsqrt: in this form ONNX Runtime fuses the exported norm into
        # one operator (SimplifiedLayerNormalization), 6 nodes fewer per norm in a decoding step
        y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32. x: [..., D]."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """kind: "rms" (default) or "layer"."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return LayerNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")
