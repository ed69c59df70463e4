"""Input projections fused: the Linear layers that read one input, as one matmul (for decoding, and for CPU training).

A decoding step at batch 1 is a chain of GEMVs, and a GEMV of a small layer is bound by its latency more than by
the bytes of its weight: at GLA-340M each of the ten per layer took 3-7 us where its bytes need about 1 us
(benchmarks/NOTES.md). Concatenating the weights of the projections that share an input (q, k, v, the gate's
low-rank half and the output gate; SwiGLU's gate and up) leaves five GEMVs per layer, each larger. The fused
weights are copies (``refresh`` re-reads the originals), used only inside ``with FusedProjections(model):``, so
training and every other forward keep the separate parameters and their gradients. A CPU training forward
concatenates the weights itself on each call (``as_one``: differentiable, no copies kept between steps).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .gemv import linear


class FusedLinear:
    """linears (same input size, dtype and device) as one: x [..., d_in] -> one output per linear, in order."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        first = linears[0].weight
        self.weight = torch.empty(sum(self.sizes), first.shape[1], dtype=first.dtype, device=first.device)
        has_bias = any(lin.bias is not None for lin in linears)
        self.bias = torch.zeros(sum(self.sizes), dtype=first.dtype, device=first.device) if has_bias else None
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current weights in, in place (a captured CUDA graph keeps reading the same buffers)."""
        start = 0
        for lin, n in zip(self.linears, self.sizes):
            self.weight[start:start + n].copy_(lin.weight)
            if lin.bias is not None:
                self.bias[start:start + n].copy_(lin.bias)
            start += n

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> the outputs side by side [..., sum of out_features]."""
        return linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.joint(x).split(self.sizes, -1))


def plain(linears: list[nn.Linear]) -> bool:
    """Whether the layers' weights can be concatenated: plain Linear layers (an adapter such as peft's LoRA adds to
    its layer's output what a copied weight lacks) with plain tensor weights (not a quantised subclass) and no
    forward hooks (pruning and weight norm set the weight in one)."""
    return all(type(lin) is nn.Linear and type(lin.weight.data) is torch.Tensor and not lin._forward_pre_hooks
               and not lin._forward_hooks for lin in linears)


def trains_as_one(x: torch.Tensor, linears: list[nn.Linear]) -> bool:
    """Whether a training forward should run ``linears`` (one input x) as one matmul (``as_one``): on the CPU, where
    a small model's step is bound by operator count (nanoGPT's recipe: 29.8 against 32.7 ms per step, one matmul
    and one bf16 cast of x instead of five); not measured on GPUs, which keep separate layers; never while
    exporting (the exported graph keeps one MatMul per weight for the quantiser)."""
    return (len(linears) > 1 and x.device.type == "cpu" and torch.is_grad_enabled()
            and not torch.compiler.is_exporting() and plain(linears))


def as_one(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """x [..., d_in] through ``linears`` as one differentiable matmul of their concatenated weights (copied per call:
    cheap beside a training batch's activations): their outputs side by side, [..., sum of out_features]."""
    w = torch.cat([lin.weight for lin in linears])
    b = None
    if any(lin.bias is not None for lin in linears):
        b = torch.cat([lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias for lin in linears])
    return torch.nn.functional.linear(x, w, b)


def joint_matmul(module: nn.Module, x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor | None:
    """The outputs of ``module``'s ``linears`` on x side by side, from one matmul where one serves: the decoding
    context's FusedLinear (``module.fused``), else ``as_one`` in CPU training; None where the separate layers
    should run."""
    if module.fused is not None:
        return module.fused.joint(x)
    if trains_as_one(x, linears):
        return as_one(x, linears)
    return None


def as_one_matmul(module: nn.Module, x: torch.Tensor, linears: list[nn.Linear]) -> list[torch.Tensor] | None:
    """``joint_matmul`` split into one output per linear (None where the separate layers should run)."""
    y = joint_matmul(module, x, linears)
    return None if y is None else list(y.split([lin.out_features for lin in linears], -1))


class FusedProjections:
    """Every module of ``model`` that offers ``input_linears()`` (GLA mixers, SwiGLU MLPs) gets a FusedLinear of
    them while the context is active; its ``forward`` then uses it where the inputs allow (no padding mask).
    model None: nothing is fused (every module keeps its separate layers)."""

    def __init__(self, model: nn.Module | None):
        modules = model.modules() if model is not None else []
        self.fused = [(m, FusedLinear(m.input_linears())) for m in modules
                      if hasattr(m, "input_linears") and len(m.input_linears()) > 1 and plain(m.input_linears())]

    def refresh(self) -> None:
        for _, f in self.fused:
            f.refresh()

    def __enter__(self) -> "FusedProjections":
        for m, f in self.fused:
            m.fused = f
        return self

    def __exit__(self, *exc) -> None:
        for m, _ in self.fused:
            m.fused = None
