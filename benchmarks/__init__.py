"""Kernel and encoder benchmarks (`fused-moonvit bench ...`); results are committed under results/."""
