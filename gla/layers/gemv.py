"""Linear layers over a few rows on a CPU (decoding): the weight's row blocks as one batched product, where that
measures faster than F.linear.

With one to eight input rows a linear layer is a matrix-vector product bound by reading its weight. How fast
``F.linear`` does that depends on the CPU and its BLAS: on this project's 2-core EPYC, MKL's GEMV read a 32000 x 1024
head at 22 GB/s at one row (9 GB/s at four), while ``torch.bmm`` over the weight cut into one block of rows per
thread reached 70 and 47 GB/s (gla-340m decoded at 77 ms/token with ``F.linear``, 37 this way); on a 2-core Xeon
with AVX-512 it was the other way round (F.linear 35-92 GB/s, the blocks 17-26: 131 against ~60 ms/token). So each
process times both once (``_batched_faster``) and ``linear`` takes the batched route only where it won: float32, at
most ROWS_MAX rows, weights of at least MIN_WEIGHT elements; anything else is ``F.linear``. The timing streams its
weights from memory, as decoding a model larger than the cache does (timed on one weight held in the cache, the two
routes came within 10% of each other on the EPYC, so each process chose at random between them and gla-340m decoded
at 50 or at 110 ms/token). The sums run in a different order than the BLAS GEMV, so results differ from it by
rounding only.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import types
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from gla.device import best_time, constant_to_compiler

ROWS_MAX = 8
# Weights streamed from memory at one row, 2 EPYC threads: 256 x 1024 gained 13.5 -> 25 GB/s, 512 x 1024 14 -> 27,
# 2816 x 1024 13 -> 40; 256 x 128 tied (7 GB/s) and 16 x 1024 lost (8 -> 5)
MIN_WEIGHT = 1 << 18
STREAMED = 12  # distinct [2048, 1024] fp32 weights the timing cycles through: 96 MB, beyond a server's L3


@functools.cache
def _batched_faster(n: int) -> bool:
    """Whether the batched route over n row blocks beats F.linear on this CPU: STREAMED [2048, 1024] fp32 weights at
    one row, best of five passes each (~0.1 s, once per process and thread count). It must win by 10%: a near tie
    keeps F.linear. (On the EPYC the batched route took 0.44-0.58 of F.linear's time over eight fresh processes.)"""
    if n < 2:
        return False
    weights = [torch.full((2048, 1024), 0.5) for _ in range(STREAMED)]
    x = torch.full((1, 1024), 0.5)
    batched = best_time(lambda: [_batched(x, w, n) for w in weights], 5)
    return batched < 0.9 * best_time(lambda: [F.linear(x, w) for w in weights], 5)


@constant_to_compiler  # a constant to torch.compile: a compiled decoding step keeps one graph
def _threads() -> int:
    """Threads to spread the row blocks over (0 where the batched route did not measure faster)."""
    n = torch.get_num_threads()
    return n if _batched_faster(n) else 0


def _blocks(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many row blocks to cut weight [O, I] into for x [..., I], or 0 for plain F.linear."""
    n = _threads()
    rows = x.numel() // max(x.shape[-1], 1)
    if (type(weight.data) is not torch.Tensor  # a tensor subclass (torchao's quantised weights) keeps F.linear
            or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or n < 2
            or not 0 < rows <= ROWS_MAX or weight.numel() < MIN_WEIGHT or weight.shape[0] % n
            or not weight.is_contiguous()):
        return 0
    return n


def _batched(x: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """x [..., I] @ weight [O, I]^T as one batched product of weight's n row blocks [n, O / n, I] and x's rows."""
    O, I = weight.shape
    rows = x.reshape(-1, I)
    y = torch.bmm(weight.view(n, O // n, I), rows.t().unsqueeze(0).expand(n, I, rows.shape[0]))  # [n, O / n, R]
    return y.permute(2, 0, 1).reshape(*x.shape[:-1], O).contiguous()  # F.linear's layout (a copy for 2+ rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., I], weight [O, I]: as one batched product of weight's row blocks where
    that measured faster (module docstring), else F.linear itself."""
    n = _blocks(x, weight)
    if not n:
        return F.linear(x, weight, bias)
    y = _batched(x, weight, n)
    return y if bias is None else y.add_(bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


_USERS: "weakref.WeakKeyDictionary[nn.Linear, int]" = weakref.WeakKeyDictionary()  # open contexts per patched layer
_LOCK = threading.Lock()


@contextlib.contextmanager
def gemv_linears(model: nn.Module):
    """Inside the context every plain nn.Linear of ``model`` computes through ``linear`` (decoding on a CPU); a
    subclass (quantised, or with adapters) keeps its own forward. The modules are restored when the last context
    open on them exits (requests of one model may overlap: interleaved streams, server threads)."""
    with _LOCK:
        mine = [m for m in model.modules() if type(m) is nn.Linear and (m in _USERS or "forward" not in m.__dict__)]
        for m in mine:
            if m not in _USERS:
                m.forward = types.MethodType(_forward, m)
            _USERS[m] = _USERS.get(m, 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            for m in mine:
                _USERS[m] -= 1
                if not _USERS[m]:
                    del _USERS[m], m.forward
