"""A GLA model's decoding step as five Triton kernels per layer (gla.ops.triton.decode_layer), for CUDA graphs.

The compiled step of gla.decoding runs about ten kernels per layer (243 at GLA-340M, batch 1), each paying a fixed
cost of a few microseconds beside the bytes it moves. Here a layer is

    p  = [W_q; W_k; W_v; W_gate1; W_r] RMSNorm(x)          (one product, the norm as its prologue)
    o  = GLA step of the state, the forget gate computed from p in the same kernel
    x' = x + W_o (RMSNorm_head(o) * swish(r))              (the output gate as prologue, the residual as epilogue)
    h  = silu(W_gate RMSNorm(x')) * (W_up RMSNorm(x'))      (SwiGLU as epilogue)
    x" = x' + W_down h

and the kernels start early under programmatic dependent launch (Hopper), streaming their weights while the previous
kernel finishes. It serves the plain GLA layer the presets build (swish output gate, RMS norms, SwiGLU, no short
convolution, feature map, key/query norm or GQA) at up to MAX_ROWS sequences; ``supports`` says where.
"""
from __future__ import annotations

import os

import torch

from gla.layers.fused import plain
from gla.layers.gla_attention import GatedLinearAttention, StaticGLAState
from gla.layers.mlp import MLP
from gla.layers.norm import RMSNorm

MAX_ROWS = 64  # the batches #22 targets; timed at 64 only with the first tensor-core kernel (benchmarks/NOTES.md)


def _plain_layer(layer) -> bool:
    a, mlp = layer.attn, layer.mlp
    return (layer.mixer == "gla" and type(a) is GatedLinearAttention and a.decay == "data"
            and a.feature_map is None and a.output_gate == "swish" and a.convs is None and a.q_norm is None
            and a.num_kv_heads == a.n_heads and a.clamp_min is None
            and type(mlp) is MLP and mlp.kind == "swiglu" and a.fused is not None and mlp.fused is not None
            and a.fused.bias is None and mlp.fused.bias is None  # the kernels add no biases
            and a.o_proj.bias is None and mlp.down_proj.bias is None
            # the kernels read these weights directly: an adapter (peft's LoRA) or a hook on them would be dropped
            and plain([a.o_proj, mlp.down_proj])
            and all(type(n) is RMSNorm for n in (layer.attn_norm, a.g_norm, getattr(layer, "mlp_norm", None)))
            and _pow2(a.head_v) and _pow2(a.head_v * a.n_heads))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(model, state) -> bool:
    """Whether FusedStep serves this model and state: every layer a plain GLA layer (module docstring) with its
    projections fused (inside a FusedProjections context), in eval mode, at most MAX_ROWS rows, GLA states on
    fp32 static buffers, weights in fp32, bf16 or fp16, the final norm an RMSNorm, no head bias, value heads of at
    most MMA_K (1024; larger ones would ask for more shared memory than an H100 has), Triton usable: on CUDA (or under
    its interpreter)."""
    from gla.ops import triton_status
    on_triton = state.seen.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if not on_triton or triton_status() is not None:
        return False
    from gla.ops.triton.decode_layer import MMA_K  # a head group must fit one step of the products along K
    return (not model.training and state.seen.shape[0] <= MAX_ROWS
            and all(layer.attn.head_v <= MMA_K for layer in model.layers if layer.mixer == "gla")
            and type(model.norm) is RMSNorm and model.lm_head.bias is None and plain([model.lm_head])
            and model.embeddings.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and all(isinstance(s, StaticGLAState) and s.recurrent.dtype == torch.float32 for s in state.layers)
            and all(_plain_layer(layer) for layer in model.layers))


class FusedStep:
    """``step(model)`` -> logits [B, vocab] of the token in ``tokens`` [B, 1]; advances ``state`` (a ModelState of
    StaticGLAState buffers) in place. The weights are read where they are at each call (the fused projections'
    copies and the model's own), so a refresh of the copies is seen by a captured graph too."""

    def __init__(self, model, state, tokens: torch.Tensor):
        if not supports(model, state):
            raise ValueError("FusedStep serves plain GLA layers inside a FusedProjections context (supports())")
        self.state, self.tokens = state, tokens
        B, dev = tokens.shape[0], tokens.device
        d, dtype = model.config.d_model, model.embeddings.weight.dtype
        a, mlp = model.layers[0].attn, model.layers[0].mlp
        self.pdl = dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9
        self.x = [torch.empty(B, d, dtype=dtype, device=dev) for _ in range(2)]  # the residual stream, ping-pong
        self.p = torch.empty(B, a.fused.weight.shape[0], dtype=dtype, device=dev)
        self.o = torch.empty(B, a.n_heads * a.head_v, dtype=dtype, device=dev)
        self.h = torch.empty(B, mlp.fused.weight.shape[0] // 2, dtype=dtype, device=dev)
        self.logits = torch.empty(B, model.lm_head.weight.shape[0], dtype=model.lm_head.weight.dtype, device=dev)

    def __call__(self, model) -> torch.Tensor:
        from gla.ops.triton.decode_layer import gated_step, row_linear
        x, x1 = self.x
        torch.index_select(model.embeddings.weight, 0, self.tokens.view(-1), out=x)
        for layer, s in zip(model.layers, self.state.layers):
            a, mlp = layer.attn, layer.mlp
            qk, kk, vv = a.n_heads * a.head_k, a.num_kv_heads * a.head_k, a.n_heads * a.head_v
            gate = a.gk_proj[1]
            row_linear(x, a.fused.weight, self.p, nw=layer.attn_norm.weight, norm=1, eps=layer.attn_norm.eps,
                       pdl=self.pdl)
            gated_step(self.p, gate.weight, gate.bias, s.recurrent, self.o, heads=a.n_heads, head_k=a.head_k,
                       head_v=a.head_v, offsets=(qk, qk + kk, qk + kk + vv), scale=a.head_k ** -0.5,
                       normalizer=a.gate_logit_normalizer, pdl=self.pdl)
            r = self.p[:, qk + kk + vv + gate.in_features:]
            row_linear(self.o, a.o_proj.weight, x1, res=x, r=r, nw=a.g_norm.weight, norm=2, head_dim=a.head_v,
                       eps=a.g_norm.eps, pdl=self.pdl)
            row_linear(x1, mlp.fused.weight, self.h, nw=layer.mlp_norm.weight, norm=1, swiglu=True,
                       eps=layer.mlp_norm.eps, pdl=self.pdl)
            row_linear(self.h, mlp.down_proj.weight, x, res=x1, pdl=self.pdl)
        row_linear(x, model.lm_head.weight, self.logits, nw=model.norm.weight, norm=1, eps=model.norm.eps,
                   pdl=self.pdl)
        self.state.seen.add_(1)
        return self.logits
