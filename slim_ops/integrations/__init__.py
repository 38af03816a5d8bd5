"""Integrations of slim_ops with model libraries (transformers: see hf.py)."""
