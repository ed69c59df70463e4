"""The GLA token mixer (Yang et al. 2024, §4.4) with the options users reach for."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gla.ops import cpu_kernels, decode_step_, gated_linear_attention, validate_cu_seqlens
from .conv import ShortConv
from .fused import as_one_matmul
from .norm import RMSNorm, make_norm
from .packing import packed_info

FEATURE_MAPS = {
    None: lambda x: x,
    "elu1": lambda x: F.elu(x) + 1,  # the seed's ELU + 1 (Katharopoulos et al. 2020)
    "relu": F.relu,
    "silu": F.silu,
}
OUTPUT_GATES = {
    "swish": F.silu,  # the paper's swish(x W_r) ⊙ norm(o)
    "sigmoid": torch.sigmoid,  # the seed's "normalized sigmoid": sigmoid(x W_r) ⊙ norm(o)
    None: None,
}


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)). While exporting, as min(x, 0) - log1p(exp(-|x|)): the ONNX translation of F.logsigmoid is
    log(sigmoid(x)), which is -inf below x ~ -88 in fp32 (trained gates reach that), and -inf - -inf = NaN in the
    gate's cumulative sums."""
    if torch.compiler.is_exporting():
        return x.clamp(max=0) - torch.log1p(torch.exp(-x.abs()))
    return F.logsigmoid(x)


def fixed_log_decay(num_kv_heads: int, head_k: int) -> torch.Tensor:
    """RetNet's per-head decay as a log gate [num_kv_heads * head_k]: gamma_h = 1 - 2^(-5-h) (Sun et al. 2023)."""
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(num_kv_heads, dtype=torch.float64))
    return gamma.log().float().repeat_interleave(head_k)


class GateProj(nn.Linear):
    """The forget gate's second (rank -> key_dim) projection; its bias starts at ``bias_init`` (here, in
    reset_parameters, and in the models' weight initialisations, which zero other biases)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float):
        self.bias_init = bias_init  # before nn.Linear's __init__, which calls reset_parameters
        super().__init__(in_features, out_features, bias=True)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.constant_(self.bias, self.bias_init)


@dataclass
class GLAState:
    """Per-layer recurrent state: recurrent [B, H, K, V] float32; conv: (q, k, v) caches [B, C, W-1] or None."""
    recurrent: torch.Tensor
    conv: tuple | None = None


@dataclass
class StaticGLAState(GLAState):
    """A GLAState made of a static decoder's buffers (gla.decoding): a one-token step writes the new recurrent state
    over ``recurrent`` (``decode_step_``) instead of returning a fresh tensor to be copied back."""


class GatedLinearAttention(nn.Module):
    """x: [B, T, d_model] -> [B, T, d_model], with a constant-size state.

    q, k = x W_q, x W_k (d_model * expand_k); v = x W_v (d_model * expand_v); forget gate
    alpha = sigmoid(x W_1 W_2 + b)^(1/gate_logit_normalizer) from a rank-``gate_low_rank_dim`` projection, i.e.
    g = logsigmoid(.) / gate_logit_normalizer (optionally clamped below at ``clamp_min``); o = GLA(q, k, v, g),
    normalised per head, gated by ``output_gate``(x W_r), projected by W_O. Parameter names follow FLA's GLA layer.
    The bias b starts at ``gate_bias_init``. With normaliser 16 and small initial weights (x W_1 W_2 ~ 0), b = 0
    (FLA's) keeps about exp(-0.043) of the state per token at first and b = 3 about exp(-0.003): a larger b lets
    early training see far back before the gate learns what to forget.

    Options: num_kv_heads (GQA: k, v and the gate are shared by groups of heads), feature_map (None | "elu1" |
    "relu" | "silu" applied to q and k), output_gate ("swish" | "sigmoid" | None), norm ("rms" | "layer"),
    use_short_conv (causal depthwise conv of width conv_size on q, k, v), qkv_bias (biases on q, k, v: models
    converted from Qwen2), qk_norm (per-head RMSNorm of q and k after the feature map: from Qwen3), backend,
    decay: "data" (GLA's gate), "fixed" (RetNet's per-head constant decay gamma_h = 1 - 2^(-5-h), Sun et al. 2023)
    or "none" (plain linear attention, Katharopoulos et al. 2020) — the baselines GLA is compared with.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *, expand_k: float = 0.5,
                 expand_v: float = 1.0, num_kv_heads: int | None = None, feature_map: str | None = None,
                 output_gate: str | None = "swish", norm: str = "rms", norm_eps: float = 1e-6,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, clamp_min: float | None = None,
                 gate_bias_init: float = 0.0,
                 use_short_conv: bool = False, conv_size: int = 4, qkv_bias: bool = False, qk_norm: bool = False,
                 decay: str = "data", backend: str = "auto"):
        super().__init__()
        num_kv_heads = num_kv_heads or n_heads
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if key_dim % n_heads or value_dim % n_heads or n_heads % num_kv_heads:
            raise ValueError(f"d_model*expand_k={key_dim} and d_model*expand_v={value_dim} must divide into "
                             f"n_heads={n_heads}, and n_heads into num_kv_heads={num_kv_heads}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")
        if output_gate not in OUTPUT_GATES:
            raise ValueError(f"output_gate must be one of {list(OUTPUT_GATES)}, got {output_gate!r}")
        if decay not in ("data", "fixed", "none"):
            raise ValueError(f"decay must be 'data', 'fixed' or 'none', got {decay!r}")
        if clamp_min is not None and clamp_min >= 0:
            raise ValueError(f"clamp_min bounds the log forget gate and must be negative, got {clamp_min}")
        self.n_heads, self.num_kv_heads = n_heads, num_kv_heads
        self.head_k, self.head_v = key_dim // n_heads, value_dim // n_heads
        self.feature_map, self.output_gate = feature_map, output_gate
        self.gate_logit_normalizer, self.clamp_min, self.backend = gate_logit_normalizer, clamp_min, backend
        kv_k, kv_v = self.head_k * num_kv_heads, self.head_v * num_kv_heads
        self.q_proj = nn.Linear(d_model, key_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, kv_k, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, kv_v, bias=qkv_bias)
        if output_gate is not None:
            self.g_proj = nn.Linear(d_model, value_dim, bias=False)
        self.decay = decay
        if decay == "data":
            self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank_dim, bias=False),
                                         GateProj(gate_low_rank_dim, kv_k, gate_bias_init))
        elif decay == "fixed":
            self.register_buffer("log_gamma", fixed_log_decay(num_kv_heads, self.head_k), persistent=False)
        self.convs = nn.ModuleList([ShortConv(c, conv_size) for c in (key_dim, kv_k, kv_v)]) \
            if use_short_conv else None
        self.g_norm = make_norm(norm, self.head_v, norm_eps)
        self.q_norm = RMSNorm(self.head_k, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_k, norm_eps) if qk_norm else None
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    fused = None  # a FusedLinear of input_linears() while decoding (gla.layers.fused)

    def input_linears(self) -> list[nn.Linear]:
        """The projections of the layer's input, in the order ``_projections`` returns them: q, k, v, then the
        gate's low-rank half (data-dependent decay) and the output gate where the layer has them."""
        gate = [self.gk_proj[0]] if self.decay == "data" else []
        return [self.q_proj, self.k_proj, self.v_proj, *gate, *([self.g_proj] if self.output_gate else [])]

    def _projections(self, x, xin):
        """(q, k, v, gate low-rank activations or None, output-gate pre-activation or None). The output gate
        reads x; the others read xin (x with padding zeroed), which is x itself when there is no mask."""
        lins = self.input_linears()
        outs = as_one_matmul(self, x, lins) if xin is x else None
        if outs is None:
            outs = [lin(xin) for lin in lins[:-1]] + [lins[-1](x if self.output_gate else xin)]
        # indexing, not list.pop: torch 2.11's dynamo turns the starred remainder into a tuple
        q, k, v = outs[0], outs[1], outs[2]
        g_low = outs[3] if self.decay == "data" else None
        return q, k, v, g_low, (outs[-1] if self.output_gate else None)

    def forward(self, x, state: GLAState | None = None, cu_seqlens=None, attention_mask=None, seq_info=None,
                use_cache: bool = True):
        """x: [B, T, d_model]; state: GLAState or None; cu_seqlens: [N+1] packed documents (B == 1);
        attention_mask: [B, T] 1 for tokens, 0 for padding (padding neither decays nor writes the state);
        seq_info: (seq_start [T], seq_last [N]) for packed input, computed once per model call.
        Returns (y [B, T, d_model], GLAState, or None when use_cache is False).
        """
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.num_kv_heads
        if cu_seqlens is not None and seq_info is None:  # called on its own: the model passes what it computed once
            validate_cu_seqlens(cu_seqlens, T)
            seq_info = packed_info(cu_seqlens, T, x.device)[:2]
        m = None if attention_mask is None else attention_mask.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
        xin = x if m is None else x * m
        q, k, v, g_low, r = self._projections(x, xin)
        conv_state = None
        if self.convs is not None:
            start, last = seq_info if seq_info is not None else (None, None)
            last = last if use_cache else None  # per-document caches are gathered only when asked for
            caches = state.conv if state is not None and state.conv is not None else (None,) * 3
            outs = [conv(t, c, start, last) for conv, t, c in zip(self.convs, (q, k, v), caches)]
            (q, cq), (k, ck), (v, cv) = outs
            conv_state = (cq, ck, cv)
        if self.decay == "data":
            gk = log_sigmoid(self.gk_proj[1](g_low).float()) / self.gate_logit_normalizer
        elif self.decay == "fixed":
            gk = self.log_gamma.expand(B, T, -1)
        else:
            gk = x.new_zeros(B, T, k.shape[-1], dtype=torch.float32)
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        if m is not None:  # padding: no decay, no write
            gk, k, v = gk * m, k * m, v * m
        q, k = FEATURE_MAPS[self.feature_map](q), FEATURE_MAPS[self.feature_map](k)
        q = q.view(B, T, H, self.head_k)
        k, v, gk = (t.view(B, T, Hkv, -1) for t in (k, v, gk))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if Hkv != H:
            k, v, gk = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v, gk))
        h0 = state.recurrent if state is not None else None
        # one token on a static decoder's buffers, whatever the backend (a single step has one algorithm): in place
        if isinstance(state, StaticGLAState) and T == 1 and cu_seqlens is None and not torch.is_grad_enabled():
            o, s = decode_step_(q[:, 0], k[:, 0], v[:, 0], gk[:, 0], h0).unsqueeze(1), h0
        else:
            # The gate stays float32 under autocast: its cumulative sums are what decays the state. It is <= 0 by
            # construction, so the operator skips its value checks (each would stall the GPU once per layer, and a
            # NaN from upstream should reach the trainer's non-finite-loss guard, not raise here).
            o, s = gated_linear_attention(q, k, v, gk, initial_state=h0, output_final_state=use_cache,
                                          cu_seqlens=cu_seqlens, backend=self.backend, check_values=False)
        if (self.output_gate == "swish" and type(self.g_norm) is RMSNorm  # one pass each way on the CPU
                and cpu_kernels.trains_eagerly(o, r)):
            o = cpu_kernels.gated_rms_norm(o, r, self.g_norm.weight, self.g_norm.eps)
        else:
            o = self.g_norm(o)
            if self.output_gate is not None:
                o = o * OUTPUT_GATES[self.output_gate](r).view(B, T, H, self.head_v)
        y = self.dropout(self.o_proj(o.reshape(B, T, H * self.head_v)))
        return y, (GLAState(s, conv_state) if use_cache else None)
