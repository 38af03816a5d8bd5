"""Masked log-probabilities (docs/objective.md, 'Log-probabilities'): reference.py, triton.py (fused LM-head kernels),
cuda.py, op.py."""
