"""Triton kernels for CUDA. Each has a torch reference in splitserve.layers (the oracle in tests)."""
