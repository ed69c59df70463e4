"""Evaluation: perplexity (ppl.py), MQAR recall (mqar.py)."""
from .ppl import evaluate, perplexity

__all__ = ["evaluate", "perplexity"]
