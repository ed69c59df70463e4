"""GLAConfig: one dataclass describing a GLA / hybrid model, with presets."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass, field


def strict_from_dict(cls, d: dict, what: str):
    """Build dataclass ``cls`` from ``d``, naming any keys it does not have (a typo in a saved config fails loudly)."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what}: {unknown}")
    return cls(**d)


def is_int(x) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A real number (int or float, Python's or numpy's), not a bool; NaN and inf included."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _as(value, kind: type):
    """``value`` as config type ``kind`` (numpy numbers become Python's, any iterable of ints a tuple, a path a
    str), or _WRONG."""
    if kind is int:
        return int(value) if is_int(value) else _WRONG
    if kind is float:
        if not is_real(value):
            return _WRONG
        return value if type(value) in (int, float) else float(value)
    if kind is bool:
        return value if isinstance(value, bool) else _WRONG
    if kind is str:
        return value if isinstance(value, str) else os.fspath(value) if isinstance(value, os.PathLike) else _WRONG
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        return _WRONG
    return tuple(int(x) if is_int(x) else x for x in value)


_WRONG = object()


def check_field_types(obj, flags: bool = False) -> None:
    """Every field of dataclass ``obj`` holds a value of its annotated type (int, float, bool, str or tuple, "| None"
    allowing None), normalised in place (numpy numbers to Python's, iterables to tuples, paths to str): a config
    read from JSON with "abc" or null where a number belongs fails here, naming the field (as a command-line flag,
    --like-this, with ``flags``), instead of deep inside the model."""
    kinds = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}
    for f in dataclasses.fields(obj):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts = [p.strip() for p in annotation.split("|")]
        value = getattr(obj, f.name)
        if value is None and "None" in parts:
            continue
        allowed = [kinds[p] for p in parts if p in kinds]
        if not allowed:
            continue
        converted = next((v for v in (_as(value, k) for k in allowed) if v is not _WRONG), _WRONG)
        if converted is _WRONG:
            name = "--" + f.name.replace("_", "-") if flags else f.name
            raise ValueError(f"{name} must be {' or '.join(parts)}, got {value!r}")
        setattr(obj, f.name, converted)


def ffn_size(d_model: int, ratio: float = 4.0, multiple: int = 256) -> int:
    """SwiGLU width with the parameter count of a ratio*d MLP: d * ratio * 2/3, rounded up to ``multiple``."""
    n = int(d_model * ratio * 2 / 3)
    return multiple * -(-n // multiple)


@dataclass
class GLAConfig:
    """Everything needed to rebuild a GLATransformer.

    mixer: the token mixer of every layer not in attn_layers: "gla", or a baseline ("linear", "retnet", "seed",
    "softmax" for an all-attention Transformer).
    attn_layers: indices of layers that use softmax attention instead (hybrids, e.g. every 4th layer).
    layer_mixers: an explicit mixer per layer (any of gla.layers.block.MIXERS); overrides mixer and attn_layers.
    max_seq_len: the context length the model is meant for (training raises it to its sequence length). No layer
    limits its input to it (GLA has no positions, RoPE no table); Hugging Face generate() reads it as
    max_position_embeddings, which caps its default max_length.
    GLA layer options (expand_k ... backend) are GatedLinearAttention's; attn_* options configure the softmax
    layers (heads default to n_heads, head_dim to d_model / heads). backend ("auto" picks the operator by device at
    each call) is saved with the config, so a checkpoint saved with "triton" needs CUDA wherever it runs.
    """
    vocab_size: int = 256
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_layers: int = 6
    max_seq_len: int = 32768
    dropout: float = 0.1
    mlp: str = "swiglu"
    norm: str = "rms"
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    expand_k: float = 0.5
    expand_v: float = 1.0
    num_kv_heads: int | None = None
    feature_map: str | None = None
    output_gate: str | None = "swish"
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    gate_bias_init: float = 0.0
    clamp_min: float | None = None
    use_short_conv: bool = False
    conv_size: int = 4
    qkv_bias: bool = False
    qk_norm: bool = False
    backend: str = "auto"
    mixer: str = "gla"
    attn_layers: tuple = field(default_factory=tuple)
    layer_mixers: tuple = field(default_factory=tuple)
    attn_heads: int | None = None
    attn_kv_heads: int | None = None
    attn_head_dim: int | None = None
    attn_qkv_bias: bool = False
    attn_qk_norm: bool = False
    rope_theta: float = 10000.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        check_field_types(self)
        if not all(is_int(i) for i in self.attn_layers):
            raise ValueError(f"attn_layers must be layer indices (ints), got {list(self.attn_layers)}")
        bad = [i for i in self.attn_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"attn_layers {bad} are outside 0..{self.n_layers - 1}")
        if self.layer_mixers and len(self.layer_mixers) != self.n_layers:
            raise ValueError(f"layer_mixers needs one entry per layer ({self.n_layers}), got {len(self.layer_mixers)}")
        from gla.layers.block import MIXERS
        from gla.ops import BACKENDS
        for m in (self.mixer, *self.layer_mixers):
            if m not in MIXERS:
                raise ValueError(f"unknown mixer {m!r}; choose from {MIXERS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {BACKENDS}")
        if not math.isfinite(self.gate_bias_init):
            raise ValueError(f"gate_bias_init must be a finite number, got {self.gate_bias_init!r}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_seq_len", "gate_low_rank_dim",
                     "conv_size", "num_kv_heads", "attn_heads", "attn_kv_heads", "attn_head_dim"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        # where a value outside these ranges gave NaN logits or a layer that cannot be built, not an error
        for name in ("norm_eps", "gate_logit_normalizer", "rope_theta", "expand_k", "expand_v"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite positive number, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.clamp_min is not None and not (math.isfinite(self.clamp_min) and self.clamp_min <= 0):
            raise ValueError(f"clamp_min bounds the log-gates from below: a finite number <= 0, got {self.clamp_min}")
        if not (math.isfinite(self.initializer_range) and self.initializer_range >= 0):
            raise ValueError(f"initializer_range must be a finite number >= 0, got {self.initializer_range}")

    def mixer_of(self, i: int) -> str:
        """The token mixer of layer i."""
        if self.layer_mixers:
            return self.layer_mixers[i]
        return "softmax" if i in self.attn_layers else self.mixer

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["attn_layers"], d["layer_mixers"] = list(self.attn_layers), list(self.layer_mixers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GLAConfig":
        return strict_from_dict(cls, d, "GLAConfig fields")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GLAConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# The paper's shapes (Yang et al. 2024, Table 2 setups; FLA's GLA configs): 4 heads, expand_k 0.5, expand_v 1.
PRESETS = {
    "tiny": dict(vocab_size=256, d_model=64, n_heads=2, d_ff=128, n_layers=2, max_seq_len=1024, dropout=0.0),
    "demo": dict(vocab_size=256, d_model=256, n_heads=4, d_ff=ffn_size(256), n_layers=4, max_seq_len=4096,
                 dropout=0.0),
    "gla-340m": dict(vocab_size=32000, d_model=1024, n_heads=4, d_ff=ffn_size(1024), n_layers=24,
                     max_seq_len=2048, dropout=0.0, initializer_range=0.006),
    "gla-1.3b": dict(vocab_size=32000, d_model=2048, n_heads=4, d_ff=ffn_size(2048), n_layers=24,
                     max_seq_len=2048, dropout=0.0, initializer_range=0.006),
}
