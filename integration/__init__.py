"""vLLM integration of the fused MoonVit encoder."""
