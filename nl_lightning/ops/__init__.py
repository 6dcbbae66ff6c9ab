"""Memory-update kernels. Each operator has a naive token-by-token reference beside its fast versions.

Plain PyTorch (no Lightning import), so the kernels work outside Lightning and under DeepSpeed.
"""
