"""The memory layers' short causal depthwise convolution, the reference: shifted multiply-adds."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_groups(y: torch.Tensor, normalized: int, group: int) -> torch.Tensor:
    """``F.normalize`` over each group of ``group`` channels among the first ``normalized`` of y."""
    if not normalized:
        return y
    heads = F.normalize(y[..., :normalized].unflatten(-1, (-1, group)), dim=-1).flatten(-2)
    return torch.cat([heads, y[..., normalized:]], dim=-1)


def naive_causal_conv(x: torch.Tensor, weight: torch.Tensor, *, normalized: int = 0, group: int = 1) -> torch.Tensor:
    """``y_t = sum_j weight[:, 0, j] * x_{t - K + 1 + j}`` (zero before the sequence), then
    :func:`normalize_groups`."""
    kernel, length = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, kernel - 1, 0))
    y = sum(weight[:, 0, j] * padded[:, j : j + length] for j in range(kernel))
    return normalize_groups(y, normalized, group)
