"""gla: Gated Linear Attention (Yang et al., ICML 2024) — operator, layers, models, training and evaluation."""
from .generation import generate, stream
from .layers import GatedLinearAttention, GLALayer, SoftmaxAttention
from .models import GLAConfig, GLATransformer, ModelState, from_pretrained
from .ops import gated_linear_attention

__all__ = ["gated_linear_attention", "GatedLinearAttention", "GLALayer", "SoftmaxAttention", "GLAConfig",
           "GLATransformer", "ModelState", "from_pretrained", "generate", "stream"]
__version__ = "0.1.0"
