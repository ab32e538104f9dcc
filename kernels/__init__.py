"""Triton kernels of the fused MoonVit forward, each with its launcher and a PyTorch reference."""
