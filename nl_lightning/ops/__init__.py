"""Memory-update kernels, one folder an op (``contract.py`` says how each is laid out): ``titans``,
``dgd``, ``projection`` (HOPE's projection memories) and ``conv`` (the memories' causal
convolution). Each op has a naive reference beside its fast versions.

Plain PyTorch (no Lightning import), so the kernels work outside Lightning and under DeepSpeed.
Models import the ops' entry points and nothing else from here.
"""

from nl_lightning.ops.contract import IMPLS, KINDS, RENAMED_IMPLS, MemoryState, memory_read

__all__ = ["IMPLS", "KINDS", "RENAMED_IMPLS", "MemoryState", "memory_read"]
