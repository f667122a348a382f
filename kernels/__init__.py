"""Triton kernels (installed as ttha.kernels)."""
