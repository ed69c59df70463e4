"""gla: Gated Linear Attention (Yang et al., ICML 2024) — operator, layers, models, training and evaluation."""
from .ops import gated_linear_attention

__all__ = ["gated_linear_attention"]
__version__ = "0.1.0"
