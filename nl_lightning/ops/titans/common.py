"""The Titans memory's gradient, shared by its implementations (the state type, the checks and
``M(z)`` itself are the op contract's, ``ops/contract.py``).

Conventions: the memory maps Dk -> Dv, weights in column convention (``M(k) = W k``, ``W`` is
``(Dv, Dk)``); ``kind="mlp"`` is ``M(z) = z + W1 silu(W2 z)``; the fast state is per batch element,
``(B, H, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nl_lightning.ops.activations import silu_grad


def loss_grad_factors(kind: str, weights: Sequence[Tensor], k: Tensor, v: Tensor):
    """Per-token gradients of ``||M(k) - v||^2`` as rank-1 factors ``[(u, x), ...]``, one pair per
    weight, with ``grad_W = u x^T`` for every token (``k, v: (B, H, N, D)``).

    Returning factors instead of matrices is what lets the chunk kernel avoid materialising one
    weight-sized gradient per token.
    """
    if kind == "linear":
        (W,) = weights
        u = 2 * (k @ W.mT - v)
        return [(u, k)]
    W1, W2 = weights
    h = k @ W2.mT
    a = torch.nn.functional.silu(h)
    u1 = 2 * (k + a @ W1.mT - v)
    u2 = (u1 @ W1) * silu_grad(h)
    return [(u1, a), (u2, k)]
