"""The causal depthwise convolution and its per-group normalisation as one C++ kernel on the CPU
(``conv_cpu.cpp``); same values and gradients as ``naive.py``."""

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


def cpu_causal_conv(x: Tensor, weight: Tensor, *, normalized: int = 0, group: int = 1) -> Tensor:
    """Same contract as ``naive_causal_conv``; float32 or float64 CPU tensors."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype:
        raise ValueError(
            f"the fused causal convolution takes float32/float64 CPU tensors of one dtype, got x {x.dtype} on "
            f"{x.device} and weight {weight.dtype}; use impl='chunk' (ATen)."
        )
    return _CausalConv.apply(x, weight[:, 0, :].t(), normalized, group)
