"""Benchmark runners (``gla bench ...``): each prints a table of ours vs references measured in one run."""
