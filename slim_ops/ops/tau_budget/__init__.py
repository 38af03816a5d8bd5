"""Fused τ-budget decode step (docs/decode.md)."""
