"""Masked log-probabilities (SPEC §4.3): reference.py, triton.py (fused LM-head kernels), cuda.py, op.py."""
