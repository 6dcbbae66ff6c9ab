"""Definitions shared by every DGD implementation: the memory kinds and SiLU's derivative."""

from __future__ import annotations

import torch

# Name -> number of weight matrices in a memory of that kind.
#   "linear": M(z) = W z,                 state (W,)       with W  (D, D)
#   "mlp":    M(z) = z + W1 silu(W2 z),   state (W1, W2)   with W1 (D, Dh), W2 (Dh, D)
KINDS = {"linear": 1, "mlp": 2}


def silu_grad(a: torch.Tensor) -> torch.Tensor:
    """d/da silu(a) = s (1 + a (1 - s)), s = sigmoid(a).

    Written out (not taken from autograd) because the inner gradient of the memory loss is part of
    the forward computation; the outer autograd differentiates through this expression.
    """
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))
