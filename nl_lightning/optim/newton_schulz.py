"""Newton–Schulz orthogonalisation: the nonlinearity that turns a momentum matrix into Muon's update.

For a matrix ``G = U S Vᵀ`` the ideal update is ``U Vᵀ`` (every singular value set to 1), the
steepest-descent direction under the spectral norm. Computing it with an SVD is slow; instead
``newton_schulz`` runs a fixed odd polynomial ``φ(x) = a x + b x³ + c x⁵`` on the singular values
five times, using only matmuls. The coefficients (3.4445, −4.7750, 2.0315) are the standard quintic
from the Muon reference: tuned for a steep slope at 0 (small singular values grow fast) rather than
for convergence to exactly 1, so after 5 steps the singular values land in a band around 1
(roughly 0.7–1.2), not on 1. That band is good enough for optimisation and is what makes the
iteration safe in bfloat16: nothing is ever divided, and every intermediate stays O(1).

Plain PyTorch: no Lightning import here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

QUINTIC = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def newton_schulz(matrix: Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> Tensor:
    """Approximate ``U Vᵀ`` of each matrix in the last two dims of ``matrix`` (leading dims are a batch).

    Args:
        matrix: ``(..., rows, cols)``; a stack of matrices is orthogonalised one by one in one batched matmul.
        steps: quintic iterations.
        dtype: the iteration's precision. ``None`` → bfloat16 on CUDA (tensor cores; the quintic is
            bf16-safe) and float32 elsewhere (CPUs without bf16 matmul units run it much slower).

    Returns a tensor of the input's shape and dtype. A zero matrix stays zero.
    """
    if matrix.dim() < 2:
        raise ValueError(
            f"newton_schulz needs a matrix (or a stack of matrices), got a tensor of shape {tuple(matrix.shape)}; "
            "vectors have no singular values to orthogonalise — update them with AdamW instead"
        )
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if dtype is None:
        dtype = torch.bfloat16 if matrix.is_cuda else torch.float32
    a, b, c = QUINTIC
    x = matrix.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix x xᵀ is then the smaller one
        x = x.mT
    # Frobenius norm ≥ spectral norm, so every singular value starts in [0, 1], where φ is designed to act.
    norm = x.float().norm(dim=(-2, -1), keepdim=True)
    x = x / (norm + 1e-7).to(dtype)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if tall:
        x = x.mT
    return x.to(matrix.dtype)


def shape_scale(shape: Sequence[int]) -> float:
    """``max(1, rows / cols) ** 0.5`` for the last two dims of ``shape``.

    An orthogonalised ``rows × cols`` matrix has RMS entry ``1 / sqrt(max(rows, cols))``. This factor
    lifts tall matrices (more outputs than inputs) to RMS ``1 / sqrt(cols)``, so a layer's per-input
    step size does not shrink with its fan-out; wide matrices are left alone. It is the factor the
    Muon reference uses, which its learning rate ~0.02 was tuned with — we keep that pairing rather
    than the ``0.2 · sqrt(max(rows, cols))`` "match AdamW's RMS" variant, whose lr is AdamW's.
    """
    rows, cols = shape[-2], shape[-1]
    return max(1.0, rows / cols) ** 0.5
