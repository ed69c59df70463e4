"""GLALayer: a pre-norm residual block, token mixer then MLP (the GLA paper's Transformer-style block)."""
from __future__ import annotations

import torch.nn as nn

from .gla_attention import GatedLinearAttention
from .mlp import MLP
from .norm import make_norm
from .softmax import SoftmaxAttention


LINEAR_MIXERS = {
    "gla": {},
    "linear": {"decay": "none"},
    "retnet": {"decay": "fixed"},
    "seed": {"feature_map": "elu1", "output_gate": "sigmoid"},
}
MIXERS = (*LINEAR_MIXERS, "softmax")
# the mixers whose forget gate is data-dependent, its bias starting at GLAConfig.gate_bias_init
GATED_MIXERS = tuple(m for m, opts in LINEAR_MIXERS.items() if opts.get("decay", "data") == "data")


class GLALayer(nn.Module):
    """x: [B, T, d_model] -> [B, T, d_model]: x + mixer(norm(x)), then + mlp(norm(.)); dropout is applied by the
    mixer and the MLP to their outputs.

    mixer: "gla" (GatedLinearAttention, default), "softmax" (SoftmaxAttention), or a baseline built from the
    GLA layer — "linear" (no decay), "retnet" (fixed per-head decay), "seed" (ELU+1 feature map and the
    normalised-sigmoid output gate); ``mixer_options`` go to the mixer, except the settings that define a
    baseline, which take precedence.
    mlp: "swiglu" (default), "gelu", or "none" (the mixer alone, as Zoology's MQAR models; d_ff is then unused).
    Parameter names follow FLA's GLABlock (attn_norm, attn, mlp_norm, mlp).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, *, mixer: str = "gla",
                 mlp: str = "swiglu", norm: str = "rms", norm_eps: float = 1e-6, **mixer_options):
        super().__init__()
        self.mixer = mixer
        self.attn_norm = make_norm(norm, d_model, norm_eps)
        if mixer in LINEAR_MIXERS:
            self.attn = GatedLinearAttention(d_model, n_heads, dropout, norm=norm, norm_eps=norm_eps,
                                             **{**mixer_options, **LINEAR_MIXERS[mixer]})
        elif mixer == "softmax":
            self.attn = SoftmaxAttention(d_model, n_heads, dropout, norm_eps=norm_eps, **mixer_options)
        else:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if mlp != "none":
            self.mlp_norm = make_norm(norm, d_model, norm_eps)
            self.mlp = MLP(d_model, d_ff, mlp, dropout)
        else:
            self.mlp = None

    def forward(self, x, state=None, **mixer_kwargs):
        """Returns (y [B, T, d_model], the mixer's new state). mixer_kwargs go to the mixer's forward."""
        h, state = self.attn(self.attn_norm(x), state, **mixer_kwargs)
        x = x + h
        return (x if self.mlp is None else x + self.mlp(self.mlp_norm(x))), state
