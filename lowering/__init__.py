"""Implementations layer: fused ops (Triton, CPU reference, fake) and aten sequences."""
