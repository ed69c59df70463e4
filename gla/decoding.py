"""Decoding with a static state: one step per token on fixed buffers, captured once as a CUDA graph and replayed.

A decode step of a small model is bound by kernel launches (about a thousand per token at GLA-340M), not by the GPU:
replaying a captured graph launches them all at once. Capture needs every tensor the step reads or writes to keep its
address, so the model state lives in buffers allocated once per request (recurrent state [B, H, K, V] fp32 and
short-convolution caches per GLA layer) that each step overwrites in place, and the token goes in through a fixed
[B, 1] buffer. On a GPU the step runs with each layer's input projections fused into one matmul (gla.layers.fused:
five GEMVs per GLA layer instead of ten), on copies of the weights refreshed at each request. The softmax layers of
hybrid models keep their keys in a StaticKVCache sized to the request, written one slot per step, with attention
over every slot under a validity mask. One captured or compiled decoder per model and state layout is kept and
reused by later requests (``decoder_for``): the capture is paid once, not per call.
"""
from __future__ import annotations

import threading
import weakref

import torch

from gla.decoding_fused import FusedStep, supports as supports_fused
from gla.layers.fused import FusedProjections
from gla.layers.gla_attention import GLAState, StaticGLAState
from gla.layers.softmax import KVCache, StaticKVCache
from gla.models import GLATransformer
from gla.models.state import ModelState, map_tensors

_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CLAIM = threading.Lock()


def _tensors(x) -> list:
    out = []
    map_tensors(out.append, x)
    return out


def static_by_default(model, device) -> bool:
    """Whether generate() decodes on a static state when not told: a plain GLATransformer, on a CPU only without
    softmax layers (their static cache is allocated for every requested token up front and each step attends over
    all of its slots, where the plain loop grows the cache as it goes)."""
    if not static_state(model):
        return False
    return torch.device(device).type == "cuda" or all(layer.mixer != "softmax" for layer in model.layers)


def static_state(model) -> bool:
    """Whether ``StaticDecoder`` serves the model: a plain GLATransformer (no wrapper whose hooks a graph could not
    replay); softmax layers keep their keys in a StaticKVCache sized to the request."""
    return isinstance(model, GLATransformer)


KV_ROUND = 256


def kv_capacity(state: ModelState, new_tokens: int) -> int | None:
    """KV slots a request needs (the prompt's keys and ``new_tokens`` more), rounded up to a multiple of KV_ROUND so
    that requests of similar lengths share a decoder and its captured graph; None without softmax layers."""
    lengths = [layer.k.shape[2] for layer in state.layers if isinstance(layer, KVCache)]
    return -(-(max(lengths) + new_tokens) // KV_ROUND) * KV_ROUND if lengths else None


def _layout(state: ModelState, capacity: int | None) -> tuple:
    """What a decoder's buffers depend on: every state tensor's shape, dtype and device, KV caches at
    ``capacity`` slots."""
    out = [(state.seen.shape, state.seen.device)]
    for layer in state.layers:
        if isinstance(layer, KVCache):
            out.append(("kv", layer.k.shape[:2], layer.k.shape[3], layer.k.dtype, layer.k.device, capacity))
        else:
            out.extend((t.shape, t.dtype, t.device) for t in _tensors(layer))
    return tuple(out)


def _allocate(state: ModelState, capacity: int | None) -> ModelState:
    """Buffers (unfilled: ``StaticDecoder.reset`` fills them) for ``state``'s layout: GLA states and convolution
    caches of their shapes, each KV cache a StaticKVCache of ``capacity`` slots sharing one ``valid`` mask and one
    ``length``."""
    B, dev = state.seen.shape[0], state.seen.device
    valid = torch.zeros(B, capacity or 0, dtype=torch.bool, device=dev)
    length = torch.zeros(1, dtype=torch.long, device=dev)

    def buffers(layer):
        if isinstance(layer, GLAState):  # updated in place by each step (decode_step_)
            return StaticGLAState(**vars(map_tensors(torch.empty_like, layer)))
        if not isinstance(layer, KVCache):
            return map_tensors(torch.empty_like, layer)
        k = layer.k.new_zeros(*layer.k.shape[:2], capacity, layer.k.shape[3])
        return StaticKVCache(k, torch.zeros_like(k), valid, length)

    return ModelState([buffers(layer) for layer in state.layers], torch.empty_like(state.seen))


def decoder_for(model, state: ModelState, capture: bool, compiled: bool = False,
                new_tokens: int = 0) -> "StaticDecoder":
    """The model's decoder for this state layout (batch, shapes, dtypes, KV capacity for ``new_tokens`` more
    tokens, where the weights are), reset to ``state`` and claimed (``busy``; the caller sets it back to False when
    its request ends). A captured or compiled one is kept and reused for the same layout while no other request
    holds it; an uncaptured, uncompiled one is built per request (nothing to reuse, and its buffers are not held
    after the request)."""
    capacity = kv_capacity(state, new_tokens)
    if not capture and not compiled:
        return StaticDecoder(model, state, capture, compiled, capacity)
    # the projection modules themselves: an adapter injected since (peft) replaces them, and fused copies of the
    # old ones would drop its output
    projections = tuple(id(lin) for m in model.modules() if hasattr(m, "input_linears") for lin in m.input_linears())
    key = (capture, compiled, next(model.parameters()).data_ptr(), projections, _layout(state, capacity))
    with _CLAIM:  # found free and marked busy in one step: two threads never get the same decoder
        cache = _DECODERS.setdefault(model, {})
        if key in cache and cache[key].busy:  # another stream is mid-request on it: a private decoder for this one
            decoder = StaticDecoder(model, state, capture, compiled, capacity)
        elif key not in cache:
            cache.clear()  # one layout at a time: a captured graph holds its own memory pool
            decoder = cache[key] = StaticDecoder(model, state, capture, compiled, capacity)
        else:
            decoder = cache[key]
            decoder.reset(state)
        decoder.busy = True  # until the caller's request ends (it sets busy back to False)
    return decoder


class StaticDecoder:
    """One token per row per ``step``, the state in place.

    model: a GLATransformer in eval mode; state: the ModelState after the prompt (copied into the static buffers).
    capture: record the step as a CUDA graph on its first call and replay it after (CUDA only); False runs the same
    in-place step eagerly (CPU, debugging). compiled: the step goes through torch.compile first (fused elementwise
    kernels: fewer launches in the graph, each one shorter). capacity: KV slots of the softmax layers (prompt and
    new tokens; ``kv_capacity``), needed when the model has any. fused: where gla.decoding_fused serves the model,
    the step is its five Triton kernels per layer instead (then ``compiled`` has no effect); None: fused for a
    captured, uncompiled step on CUDA (H100, gla-340m, bf16, B=1: 0.46 ms per token without compiling, the compiled
    step 0.83-0.89 in earlier calls after 15-39 s of compilation; at B=16 and 64 the compiled step was faster:
    benchmarks/NOTES.md, nineteenth and twentieth sessions).
    """

    def __init__(self, model, state: ModelState, capture: bool, compiled: bool = False, capacity: int | None = None,
                 fused: bool | None = None):
        if not static_state(model):
            raise ValueError("static decoding needs a plain GLATransformer (wrappers hook the forward that a graph "
                             "replays): pass cuda_graph=False")
        if capacity is None and any(isinstance(layer, KVCache) for layer in state.layers):
            raise ValueError("a model with softmax layers needs the KV capacity of the request (kv_capacity)")
        # weak: the decoder lives in a cache keyed weakly by the model, which a strong reference would keep alive
        self.model = weakref.ref(model)
        self.capacity = capacity
        self.state = _allocate(state, capacity)
        self.kv = [layer for layer in self.state.layers if isinstance(layer, StaticKVCache)]
        self.buffers = _tensors(self.state)
        B = self.state.seen.shape[0]
        if fused is None:
            fused = capture and self.state.seen.is_cuda and not compiled
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=self.state.seen.device)
        self.capture = capture
        self.busy = False  # claimed by decoder_for for a request, released by its caller (others get their own)
        # Fused copies of the input projections' weights only on a GPU, whose captured step is bound by its number of
        # kernels: on a 2-core CPU they gave 2-3% (gla-340m 61.2 -> 59.8 ms/token, demo 1.59 -> 1.54) for a second
        # copy of most of the weights (0.9 GB at gla-340m in fp32). The fused Triton step reads them on any device.
        self.fused = FusedProjections(model if self.state.seen.is_cuda or fused else None)
        # not fullgraph: past dynamo's recompile limit (one compile per state layout) the step falls back to eager.
        # On CUDA the step's matmuls are autotuned (Triton GEMV templates with the norms fused in, or cuBLAS) and the
        # graph is captured here, not by Inductor: H100, gla-340m, captured step 0.97 -> 0.78 ms at B=1 and
        # 1.24 -> 1.22 ms at B=16, for 39 s instead of 17 s of compilation at B=1 (56 s instead of 23 at B=16).
        mode = "max-autotune-no-cudagraphs" if self.state.seen.is_cuda else None
        self.run = torch.compile(self._step, dynamic=False, mode=mode) if compiled else self._step
        if fused:
            with self.fused:
                if supports_fused(model, self.state):
                    self.run = FusedStep(model, self.state, self.tokens)
        self.graph = None
        self.logits = None
        self.reset(state, refresh=False)

    def reset(self, state: ModelState, refresh: bool = True) -> None:
        """Start from ``state`` (same layout): copied into the buffers the captured step reads, with the model's
        current weights (it may have trained since the last request)."""
        if refresh:
            self.fused.refresh()
        self.state.seen.copy_(state.seen)
        prompt = None  # KV length of the prompt, the same in every softmax layer
        for buf, layer in zip(self.state.layers, state.layers, strict=True):
            if isinstance(buf, StaticKVCache):
                prompt = layer.k.shape[2]
                buf.k[:, :, :prompt].copy_(layer.k)
                buf.v[:, :, :prompt].copy_(layer.v)
                buf.k[:, :, prompt:].zero_()  # masked slots still enter the product: no NaN left from another request
                buf.v[:, :, prompt:].zero_()
            else:
                for b, t in zip(_tensors(buf), _tensors(layer), strict=True):
                    b.copy_(t)
        self.slots_left = None if prompt is None else self.capacity - prompt
        if self.kv:  # shared by every softmax layer
            valid, length = self.kv[0].valid, self.kv[0].length
            valid.zero_()
            valid[:, :prompt] = True if state.key_mask is None else state.key_mask
            length.fill_(prompt)

    def _step(self, model) -> torch.Tensor:
        logits, new = model(self.tokens, self.state)
        for buf, t in zip(self.buffers, _tensors(new), strict=True):
            if t is not buf:  # KV caches were written in place
                buf.copy_(t)
        if self.kv:
            self.kv[0].length.add_(1)
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] long (on the model's device) -> logits [B, vocab] of the next position. With capture, the
        returned tensor is a static buffer that the next step overwrites."""
        if self.slots_left is not None:
            if self.slots_left == 0:
                raise ValueError(f"the KV cache's {self.capacity} slots are full: ask decoder_for for more new tokens")
            self.slots_left -= 1
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
        """Warm up on a side stream (first calls compile kernels and allocate), restoring after each call the state
        it advanced (a KV cache then never writes past the slot the first real step writes), then capture one
        step."""
        saved = [b.clone() for b in self.buffers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run(model)
                for buf, s in zip(self.buffers, saved):
                    buf.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.run(model)
