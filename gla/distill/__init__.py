"""Softmax transformers into GLA / hybrid models: weight conversion (``convert``) and distillation (stage 1,
attention transfer, in ``transfer``; stage 2 is `gla train` with a teacher: `gla distill`)."""
from .convert import convert, layer_pattern
from .transfer import attention_transfer, load_teacher

__all__ = ["convert", "layer_pattern", "attention_transfer", "load_teacher"]
