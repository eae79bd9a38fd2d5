"""Backends: one small interface over a causal LM (see base.py)."""
