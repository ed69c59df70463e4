"""The state a model carries between calls: one entry per layer, never shared between layers.

One walker, ``map_tensors``, serves everything that goes through a state tree (selecting batch rows, measuring the
memory it holds): GLAState, KVCache and ModelState nest as dataclasses, lists and tuples.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def map_tensors(fn, x):
    """x with fn applied to every tensor inside it. Dataclasses, lists, tuples and dicts are rebuilt around the
    results; anything else (None, numbers) is kept as it is."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if x is None:  # before the dataclass test, which torch 2.11's dynamo cannot trace on None
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, t) for t in x)
    if isinstance(x, dict):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return type(x)(**{f.name: map_tensors(fn, getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


def state_bytes(x) -> int:
    """Bytes held by every tensor inside x (a ModelState, a layer's state, or any nesting map_tensors walks)."""
    sizes = []
    map_tensors(lambda t: sizes.append(t.numel() * t.element_size()), x)
    return sum(sizes)


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
        return map_tensors(lambda t: t[rows], self)
