"""nn.Modules built on the GLA operator."""
from .block import GLALayer
from .gla_attention import GatedLinearAttention, GLAState, StaticGLAState
from .mlp import MLP
from .norm import LayerNorm, RMSNorm
from .softmax import KVCache, SoftmaxAttention, StaticKVCache

__all__ = ["GLALayer", "GatedLinearAttention", "GLAState", "MLP", "LayerNorm", "RMSNorm", "KVCache", "StaticKVCache",
           "SoftmaxAttention", "StaticGLAState"]
