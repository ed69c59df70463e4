"""Softmax transformers into GLA / hybrid models: weight conversion (``convert``) and, later, distillation."""
from .convert import convert, layer_pattern

__all__ = ["convert", "layer_pattern"]
