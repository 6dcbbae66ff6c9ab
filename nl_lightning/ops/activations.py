"""Activation derivatives shared by the memory kernels."""

from __future__ import annotations

import torch


def silu_grad(h: torch.Tensor) -> torch.Tensor:
    """d/dh [h · sigmoid(h)] = s (1 + h (1 − s)), s = sigmoid(h).

    Written out (not taken from autograd) because the inner gradient of a memory's loss is part
    of the forward computation; the outer autograd then differentiates through this expression.
    """
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))
