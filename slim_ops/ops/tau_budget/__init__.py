"""Fused τ-budget decode step (SPEC.md §2)."""
