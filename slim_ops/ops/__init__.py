"""One sub-package per op: reference.py (fp32 PyTorch spec), triton.py, cuda.py, op.py (public)."""
