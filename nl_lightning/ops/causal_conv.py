"""The memory layers' short causal depthwise convolution as one C++ kernel on the CPU
(``ops/cpu/causal_conv.cpp``), optionally with the per-group L2 normalisation that follows it
(Titans normalises its queries and keys per head).

Same values and gradients as ``CausalDepthwiseConv`` (``nl_lightning/models/titans.py``) followed by
``F.normalize`` on each group of the first ``normalized`` channels; the ATen path stays the
reference (tests/test_memory_models.py compares the two in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nl_lightning.ops.cpu_extension import KERNEL_DTYPES, load_extension


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, taps, normalized, group):
        x, taps = x.contiguous(), taps.contiguous()
        y, inv_norm = load_extension().causal_conv_forward(x, taps, normalized, group)
        ctx.save_for_backward(x, taps, y, inv_norm)
        ctx.normalized, ctx.group = normalized, group
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, taps, y, inv_norm = ctx.saved_tensors
        dx, dtaps = load_extension().causal_conv_backward(
            x, taps, y, inv_norm, dy.contiguous(), ctx.normalized, ctx.group
        )
        return dx, dtaps, None, None


def cpu_fused_causal_conv(x: Tensor, weight: Tensor, *, normalized: int = 0, group: int = 1) -> Tensor:
    """Causal depthwise convolution of ``x`` (B, T, C) with ``weight`` (C, 1, K), the ``nn.Conv1d``
    layout (tap K-1 is the current token), then ``F.normalize`` over each group of ``group``
    channels among the first ``normalized``. CPU, float32 or float64."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype:
        raise ValueError(
            f"the fused causal convolution takes float32/float64 CPU tensors of one dtype, got x {x.dtype} on "
            f"{x.device} and weight {weight.dtype}; use the ATen path (memory_impl='chunk')."
        )
    if x.dim() != 3 or weight.shape[:2] != (x.shape[-1], 1):
        raise ValueError(f"x must be (B, T, C) and weight (C, 1, K); got {tuple(x.shape)} and {tuple(weight.shape)}.")
    if normalized and (group <= 0 or normalized % group or normalized > x.shape[-1]):
        raise ValueError(
            f"normalized={normalized} channels must be at most C={x.shape[-1]} and a multiple of group={group}."
        )
    return _CausalConv.apply(x, weight[:, 0, :].t(), normalized, group)
