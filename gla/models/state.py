"""The state a model carries between calls: one entry per layer, never shared between layers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def _map(fn, x):
    """Apply fn to every tensor inside x (tensors, tuples, dataclasses, None)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map(fn, t) for t in x)
    return type(x)(**{f.name: _map(fn, getattr(x, f.name)) for f in dataclasses.fields(x)})


@dataclass
class ModelState:
    """layers: per layer a GLAState (GLA layers) or KVCache (softmax layers; None after packed input);
    seen: [B] tokens seen so far per row (rotary position of the next token);
    key_mask: [B, L] bool, False at padded positions of the KV cache, or None (no padding so far, or no softmax
    layer: a GLA-only model keeps nothing that grows with the context)."""
    layers: list
    seen: torch.Tensor
    key_mask: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> "ModelState":
        """Keep the given batch rows: rows [B'] long."""
        return _map(lambda t: t[rows], self)
