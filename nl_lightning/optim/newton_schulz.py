"""Newton–Schulz orthogonalisation: the nonlinearity that turns a momentum matrix into Muon's update.

For a matrix ``G = U S Vᵀ`` the ideal update is ``U Vᵀ`` (every singular value set to 1), the
steepest-descent direction under the spectral norm. Computing it with an SVD is slow; instead
``newton_schulz`` runs a fixed odd polynomial ``φ(x) = a x + b x³ + c x⁵`` on the singular values
five times, using only matmuls. The coefficients (3.4445, −4.7750, 2.0315) are the standard quintic
from the Muon reference: tuned for a steep slope at 0 (small singular values grow fast) rather than
for convergence to exactly 1, so after 5 steps the singular values land in a band around 1
(roughly 0.7–1.2), not on 1. That band is good enough for optimisation and is what makes the
iteration safe in bfloat16: nothing is ever divided, and every intermediate stays O(1).

Cost. One iteration on a wide ``m × n`` matrix (m ≤ n) is three matmuls, ``A = X Xᵀ`` (m²n),
``B = b A + c A²`` (m³) and ``X ← a X + B X`` (m²n); tall matrices are transposed first so that the
Gram matrix is always the smaller ``min × min`` one. The two affine steps are single
``baddbmm`` calls writing into buffers allocated once per call, so the five iterations allocate
nothing. An optimizer step orthogonalises dozens of small matrices; ``newton_schulz_many`` stacks
those of the same (oriented) shape and runs one batched chain per shape, which is what keeps a GPU
busy instead of launching ~15 tiny kernels per matrix.

Precision (``dtype`` / the optimizers' ``ns_dtype``): ``None`` runs bfloat16 on CUDA (tensor cores;
the quintic is bf16-safe) and float32 elsewhere, because CPUs without bf16 matmul units run bf16
matmuls several times slower than float32. The norm is always taken in float32 and the result is
returned in the input's dtype.

Plain PyTorch: no Lightning import here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

QUINTIC = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_ns_dtype(ns_dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The iteration's dtype: ``None`` / ``"auto"`` → bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if ns_dtype is None or ns_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return check_ns_dtype(ns_dtype)


def check_ns_dtype(ns_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Validate an ``ns_dtype`` option (a name, a torch floating dtype, ``"auto"`` or ``None``)."""
    if ns_dtype is None or ns_dtype == "auto":
        return None
    if isinstance(ns_dtype, torch.dtype) and ns_dtype in NS_DTYPES.values():
        return ns_dtype
    if isinstance(ns_dtype, str) and ns_dtype.removeprefix("torch.") in NS_DTYPES:
        return NS_DTYPES[ns_dtype.removeprefix("torch.")]
    raise ValueError(
        f"ns_dtype = {ns_dtype!r} is not a Newton–Schulz precision; use None/'auto' (bfloat16 on CUDA, float32 "
        f"elsewhere) or one of {sorted(NS_DTYPES)}"
    )


def newton_schulz(matrix: Tensor, steps: int = NS_STEPS, dtype: str | torch.dtype | None = None) -> Tensor:
    """Approximate ``U Vᵀ`` of each matrix in the last two dims of ``matrix`` (leading dims are a batch).

    Args:
        matrix: ``(..., rows, cols)``; a stack of matrices is orthogonalised one by one in one batched matmul.
        steps: quintic iterations.
        dtype: the iteration's precision, see the module docstring (``None`` → bfloat16 on CUDA, float32 elsewhere).

    Returns a new tensor of the input's shape and dtype. A zero matrix stays zero.
    """
    _check_matrix(matrix)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    dtype = resolve_ns_dtype(dtype, matrix.device)
    rows, cols = matrix.shape[-2:]
    x = matrix.reshape(-1, rows, cols)
    if rows > cols:  # iterate on the wide orientation: the Gram matrix x xᵀ is then the smaller one
        x = x.mT
    x = _orthogonalise_wide(x, steps, dtype)
    if rows > cols:
        x = x.mT
    return x.reshape(matrix.shape).to(matrix.dtype)


def newton_schulz_many(matrices: Sequence[Tensor], steps: int = NS_STEPS,
                       dtype: str | torch.dtype | None = None) -> list[Tensor]:
    """``newton_schulz`` of every tensor in ``matrices``, one batched iteration per oriented shape.

    Matrices are grouped by device, dtype and their shape after transposing tall ones to wide
    (a ``(192, 48)`` and a ``(48, 192)`` matrix share a batch); 3+-dim tensors contribute each of their
    matrices. The results equal per-matrix ``newton_schulz`` up to float rounding. They are returned
    in input order, with the inputs' shapes and dtypes, as views into one output per batch (a tall
    input's result is a transposed view): copy one that must outlive the others, e.g. into state.
    """
    batches: dict[tuple, list[int]] = {}
    for index, matrix in enumerate(matrices):
        _check_matrix(matrix)
        rows, cols = matrix.shape[-2:]
        key = (matrix.device, matrix.dtype, min(rows, cols), max(rows, cols))
        batches.setdefault(key, []).append(index)
    results: list[Tensor | None] = [None] * len(matrices)
    for (device, _, _, _), indices in batches.items():
        stacks = []
        for index in indices:
            rows, cols = matrices[index].shape[-2:]
            stack = matrices[index].reshape(-1, rows, cols)
            stacks.append(stack.mT if rows > cols else stack)
        # torch.cat copies into one contiguous (N, m, n) batch; the tall ones are transposed on the way.
        batch = _orthogonalise_wide(torch.cat(stacks), steps, resolve_ns_dtype(dtype, device))
        batch = batch.to(matrices[indices[0]].dtype)
        for index, piece in zip(indices, batch.split([len(s) for s in stacks])):
            rows, cols = matrices[index].shape[-2:]
            results[index] = (piece.mT if rows > cols else piece).reshape(matrices[index].shape)
    return results


def _orthogonalise_wide(x: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """The quintic iteration on a batch ``(N, m, n)`` with m ≤ n, in ``dtype``; returns a new tensor."""
    # Frobenius norm ≥ spectral norm, so every singular value starts in [0, 1], where φ is designed to act.
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    x = (x / (norm + 1e-7)).to(dtype).contiguous()
    if steps == 0:
        return x
    a, b, c = QUINTIC
    gram = x.new_empty(x.shape[:-1] + (x.size(-2),))
    poly, spare = torch.empty_like(gram), torch.empty_like(x)
    for _ in range(steps):
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)  # b·A + c·A²
        torch.baddbmm(x, poly, x, beta=a, out=spare)  # a·X + (b·A + c·A²)·X
        x, spare = spare, x
    return x


def _check_matrix(matrix: Tensor) -> None:
    if matrix.dim() < 2:
        raise ValueError(
            f"newton_schulz needs a matrix (or a stack of matrices), got a tensor of shape {tuple(matrix.shape)}; "
            "vectors have no singular values to orthogonalise — update them with AdamW instead"
        )


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
