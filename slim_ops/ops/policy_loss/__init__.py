"""SLIM-RL policy loss (docs/objective.md, 'The SLIM loss'): reference.py (fp32 spec), triton.py (row kernels), op.py
(public)."""
