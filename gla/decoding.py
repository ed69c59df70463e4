"""Decoding with a static state: one step per token on fixed buffers, captured once as a CUDA graph and replayed.

A decode step of a small model is bound by kernel launches (about a thousand per token at GLA-340M), not by the GPU:
replaying a captured graph launches them all at once. Capture needs every tensor the step reads or writes to keep its
address, so the model state lives in buffers allocated once per request (recurrent state [B, H, K, V] fp32 and
short-convolution caches per GLA layer) that each step overwrites in place, and the token goes in through a fixed
[B, 1] buffer. The step runs with each layer's input projections fused into one matmul (gla.layers.fused: five
GEMVs per GLA layer instead of ten), on copies of the weights refreshed at each request. Hybrid models (softmax
layers, whose KV cache grows) take the eager step. One decoder per model and state layout is kept and reused by
later requests (``decoder_for``): the capture is paid once, not per call.
"""
from __future__ import annotations

import weakref

import torch

from gla.layers.fused import FusedProjections
from gla.models import GLATransformer
from gla.models.state import ModelState, map_tensors

_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tensors(x) -> list:
    out = []
    map_tensors(out.append, x)
    return out


def static_state(model) -> bool:
    """Whether the model's decoding state has a fixed size: a plain GLATransformer (no wrapper whose hooks a graph
    could not replay) with GLA-family layers only."""
    return isinstance(model, GLATransformer) and all(layer.mixer != "softmax" for layer in model.layers)


def graphable(model, device) -> bool:
    """Whether ``StaticDecoder`` captures this model's step: a CUDA device and a fixed-size state."""
    return torch.device(device).type == "cuda" and static_state(model)


def decoder_for(model, state: ModelState, capture: bool, compiled: bool = False) -> "StaticDecoder":
    """The model's decoder for this state layout (batch, shapes, dtypes and where the weights are), reset to
    ``state``; built (and on the first step captured) only for a layout not seen before."""
    tensors = _tensors(state)
    key = (capture, compiled, next(model.parameters()).data_ptr(),
           tuple((t.shape, t.dtype, t.device) for t in tensors))
    cache = _DECODERS.setdefault(model, {})
    if key not in cache:
        cache.clear()  # one layout at a time: a captured graph holds its own memory pool
        cache[key] = StaticDecoder(model, state, capture, compiled)
    else:
        cache[key].reset(state)
    return cache[key]


class StaticDecoder:
    """One token per row per ``step``, the state in place.

    model: a GLATransformer with GLA-family layers only (``static_state``), in eval mode; state: the ModelState after
    the prompt (copied into the static buffers). capture: record the step as a CUDA graph on its first call and replay
    it after (CUDA only); False runs the same in-place step eagerly (CPU, debugging). compiled: the step goes through
    torch.compile first (fused elementwise kernels: fewer launches in the graph, each one shorter)."""

    def __init__(self, model, state: ModelState, capture: bool, compiled: bool = False):
        if not static_state(model):
            raise ValueError("static decoding needs a GLATransformer without softmax layers (a hybrid's KV cache "
                             "grows every step): pass cuda_graph=False")
        # weak: the decoder lives in a cache keyed weakly by the model, which a strong reference would keep alive
        self.model = weakref.ref(model)
        self.state = map_tensors(torch.clone, state)
        self.buffers = _tensors(self.state)
        B = self.state.seen.shape[0]
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=self.state.seen.device)
        self.capture = capture
        self.fused = FusedProjections(model)
        # not fullgraph: past dynamo's recompile limit (one compile per state layout) the step falls back to eager
        self.run = torch.compile(self._step, dynamic=False) if compiled else self._step
        self.graph = None
        self.logits = None

    def reset(self, state: ModelState) -> None:
        """Start from ``state`` (same layout): copied into the buffers the captured step reads, with the model's
        current weights (it may have trained since the last request)."""
        self.fused.refresh()
        for buf, t in zip(self.buffers, _tensors(state), strict=True):
            buf.copy_(t)

    def _step(self, model) -> torch.Tensor:
        logits, new = model(self.tokens, self.state)
        for buf, t in zip(self.buffers, _tensors(new), strict=True):
            buf.copy_(t)
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] long (on the model's device) -> logits [B, vocab] of the next position. With capture, the
        returned tensor is a static buffer that the next step overwrites."""
        self.tokens.copy_(tokens.view(-1, 1))
        if not self.capture:
            with self.fused:
                return self.run(self.model())
        if self.graph is None:
            with self.fused:
                self._record(self.model())
        self.graph.replay()
        return self.logits

    def _record(self, model) -> None:
        """Warm up on a side stream (first calls compile kernels and allocate), restore the state the warm-up
        advanced, then capture one step."""
        saved = [b.clone() for b in self.buffers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run(model)
        torch.cuda.current_stream().wait_stream(side)
        for buf, s in zip(self.buffers, saved):
            buf.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.run(model)
