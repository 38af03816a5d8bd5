"""SLIM-RL policy loss (SPEC §4.4-4.5): reference.py (fp32 spec), triton.py (row kernels), op.py (public)."""
