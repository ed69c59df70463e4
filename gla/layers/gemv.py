"""Linear layers over a few rows on a CPU (decoding): the weight's row blocks as one batched product.

With one to eight input rows a linear layer is a matrix-vector product bound by reading its weight. On x86 CPUs the
MKL build of PyTorch runs ``F.linear`` with so few rows at a fraction of the memory bandwidth (this project's 2-core
EPYC: 22 GB/s for a 32000 x 1024 head at one row, 9 GB/s at four), while ``torch.bmm`` over the weight cut into
one block of rows per thread reaches 70 and 47 GB/s (benchmarks/NOTES.md). gla-340m decoded at 77 ms/token with
``F.linear`` and 37 ms/token this way. ``linear`` takes the batched route only where it was measured faster: float32
on an x86 CPU with MKL, at most ROWS_MAX rows, weights of at least MIN_WEIGHT elements; anything else is
``F.linear``. The sums run in a different order than MKL's GEMV, so results differ from it by rounding only.
"""
from __future__ import annotations

import contextlib
import functools
import platform
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS_MAX = 8
MIN_WEIGHT = 1 << 20  # a 1024 x 1024 weight gained 80 -> 100 GB/s at one row; a 256 x 128 one lost


@functools.cache
def _x86_mkl() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkl.is_available()


@torch.compiler.assume_constant_result  # a constant to torch.compile: a compiled decoding step keeps one graph
def _threads() -> int:
    """Threads to spread the row blocks over (0 where the batched route was not measured faster)."""
    return torch.get_num_threads() if _x86_mkl() else 0


def _blocks(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many row blocks to cut weight [O, I] into for x [..., I], or 0 for plain F.linear."""
    n = _threads()
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or n < 2
            or not 0 < rows <= ROWS_MAX or weight.numel() < MIN_WEIGHT or weight.shape[0] % n
            or not weight.is_contiguous()):
        return 0
    return n


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., I], weight [O, I]: as one batched product of weight's row blocks
    [n, O / n, I] and the rows of x where that is faster (module docstring), else F.linear itself."""
    n = _blocks(x, weight)
    if not n:
        return F.linear(x, weight, bias)
    O, I = weight.shape
    rows = x.reshape(-1, I)
    y = torch.bmm(weight.view(n, O // n, I), rows.t().unsqueeze(0).expand(n, I, rows.shape[0]))  # [n, O / n, R]
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], O).contiguous()  # F.linear's layout (a copy for 2+ rows)
    return y if bias is None else y.add_(bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


@contextlib.contextmanager
def gemv_linears(model: nn.Module):
    """Inside the context every plain nn.Linear of ``model`` computes through ``linear`` (decoding on a CPU); a
    subclass (quantised, or with adapters) keeps its own forward. The modules are restored on exit."""
    patched = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__]
    for m in patched:
        m.forward = types.MethodType(_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
