"""The memory layers' short causal depthwise convolution, optionally followed by a per-group L2
normalisation (Titans normalises its queries and keys per head), as an op (``ops/contract.py``):
``naive.py`` (shifted multiply-adds, the reference), ``chunk.py`` (ATen), ``cpu.py`` +
``conv_cpu.cpp``."""

from __future__ import annotations

import torch

from nl_lightning.ops.contract import check_impl, resolve_impl
from nl_lightning.ops.conv.chunk import chunk_causal_conv
from nl_lightning.ops.conv.cpu import cpu_causal_conv
from nl_lightning.ops.conv.naive import naive_causal_conv
from nl_lightning.ops.cpu_extension import KERNEL_DTYPES

IMPLEMENTED = ("naive", "chunk", "cpu")
_FUNCTIONS = {"naive": naive_causal_conv, "chunk": chunk_causal_conv, "cpu": cpu_causal_conv}  # "triton": none yet
# A convolution is one ATen call already: "compiled" and "triton" run the ATen path (the models
# pass one memory_impl to all their ops).
CHUNK_PATH = ("compiled", "triton")

__all__ = ["IMPLEMENTED", "causal_conv"]


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, *, normalized: int = 0, group: int = 1, impl: str = "auto"
) -> torch.Tensor:
    """Causal depthwise convolution: output t sees inputs t-K+1 .. t only.

    Args:
        x: (B, T, C) inputs.
        weight: (C, 1, K) taps in ``nn.Conv1d``'s layout (tap K-1 is the current token).
        normalized, group: then ``F.normalize`` over each group of ``group`` channels among the
            first ``normalized`` (0: none).
        impl: ``"naive"``, ``"chunk"`` (ATen), ``"cpu"`` or ``"auto"`` (``"cpu"`` where it applies,
            else ``"chunk"``); ``"compiled"``/``"triton"`` run ``"chunk"``. The C++ kernel is built
            for float32/float64 without autocast; with other dtypes, or under autocast, ``"cpu"``
            runs the ATen path as mixed precision expects (it has no half-precision build).

    Returns:
        (B, T, C), in x's memory layout.
    """
    impl = "chunk" if impl in CHUNK_PATH else impl
    check_impl(impl, IMPLEMENTED, "causal_conv")
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[:2] != (x.shape[-1], 1):
        raise ValueError(f"x must be (B, T, C) and weight (C, 1, K); got {tuple(x.shape)} and {tuple(weight.shape)}.")
    channels = x.shape[-1]
    if normalized and (group <= 0 or normalized % group or normalized > channels):
        raise ValueError(f"normalized={normalized} channels must be at most C={channels} and a multiple of group={group}.")
    kernel_applies = (
        x.dtype in KERNEL_DTYPES and weight.dtype == x.dtype and not torch.is_autocast_enabled(x.device.type)
    )
    if impl == "cpu" and not kernel_applies:
        impl = "chunk"
    impl = resolve_impl(impl, x, cpu_applies=kernel_applies)
    return _FUNCTIONS[impl](x, weight, normalized=normalized, group=group)
