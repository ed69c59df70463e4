"""Evaluation: perplexity (ppl.py), MQAR recall (mqar.py, its command line and tables in mqar_report.py)."""
from .ppl import evaluate, perplexity

__all__ = ["evaluate", "perplexity"]
