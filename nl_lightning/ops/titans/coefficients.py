"""Gate-only coefficients of the chunk-parallel Titans memory (see ``chunk.py`` for the algebra).

Inside a chunk (i, j, m index its tokens) the memory after token i is::

    S_i = A_i S0 - sum_{j<=i} E_ij theta_j G_j           A_i = prod_{l<=i} eta_l
    W_i = beta_i W0 + c_i S0 - sum_{j<=i} P_ij theta_j G_j
                                                       beta_i = prod_{l<=i} (1 - alpha_l)
    E_ij = prod_{j<l<=i} eta_l,  D_im = prod_{m<l<=i} (1 - alpha_l)
    c = D A,  P = D E     (C x C lower-triangular matmuls: the "parallel scan" of the momentum)

Numerics: the segment products ``E`` and ``D`` are formed directly as masked cumulative products,
never as ratios of cumulative products, which underflow to 0/0 over long chunks with strong
decay (differences of cumulative log-sums avoid the 0/0 but cannot represent a gate of exactly
0 and lose float32 precision). The backward is written out without any division, so gates of
exactly 0 or 1 get exact gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class ChunkCoefficients(NamedTuple):
    """Gate-only coefficients of every chunk, shapes ``(B, H, N, C[, C])`` (N chunks of C tokens).

    ``*_end`` are the same quantities at the chunk's last real token, which give the state
    handed to the next chunk (the last chunk may be partial, so this is not always row C-1).
    """

    beta: Tensor  # (B, H, N, C)    weight of the chunk-start weights W0 in W_i
    carry: Tensor  # (B, H, N, C)   c_i: weight of the chunk-start momentum S0 in W_i
    mix: Tensor  # (B, H, N, C, C)  P_ij theta_j: weight of token j's gradient in W_i
    beta_end: Tensor  # (B, H, N)
    carry_end: Tensor  # (B, H, N)
    momentum_end: Tensor  # (B, H, N)  A_L: weight of S0 in the end momentum
    mix_end: Tensor  # (B, H, N, C)    row L of mix
    surprise_end: Tensor  # (B, H, N, C)  E_Lj theta_j: weight of G_j in the end momentum


def segment_products(x: Tensor) -> Tensor:
    """``out[..., i, m] = prod_{m < l <= i} x[..., l]`` for ``i >= m`` and 0 above the diagonal.

    A cumulative product over a masked copy (factors with ``l <= m`` replaced by 1), so no
    division by a cumulative product that may have underflowed.
    """
    C = x.shape[-1]
    idx = torch.arange(C, device=x.device)
    after_m = idx[None, :] > idx[:, None]  # [m, l]: factor l belongs to the segment after m
    factors = torch.where(after_m, x.unsqueeze(-2), torch.ones((), dtype=x.dtype, device=x.device))
    # Built as [m, i] and returned transposed: a cumulative product along the contiguous last
    # dim is about 3x faster than along the strided one.
    return factors.cumprod_(dim=-1).triu_().mT


def _grad_of_factors(segments: Tensor, through: Tensor) -> Tensor:
    """Gradient w.r.t. the factors x of ``segments = segment_products(x)`` given
    ``through = grad_segments @ segments^T``.

    Splitting a segment at the differentiated factor l gives, with no division (so exact also
    when a factor is exactly 0)::

        d segments[i, m] / d x[l] = segments[l-1, m] * segments[i, l]      for m < l <= i
        grad_x[l] = sum_i segments[i, l] * through[i, l-1]
    """
    grad_x = (segments[..., :, 1:] * through[..., :, :-1]).sum(-2)
    return F.pad(grad_x, (1, 0))  # the first factor of a chunk starts no segment


class _GradientMix(torch.autograd.Function):
    """``mix = (D E) o theta_j`` with ``D = segment_products(keep)``, ``E = segment_products(eta)``,
    plus the two things read off it: ``carry = eta_0 (D E)[:, 0]`` (``c = D A`` with
    ``A_m = eta_0 E_m0``) and ``mix_end``, the row of each chunk's last real token.

    Backward written out: autograd would spend two C x C x C matmuls on ``D E``, go through
    ``torch.cumprod``'s backward (which searches for zeros and falls back to a slow path), and
    fill a zero C x C gradient for each of ``carry`` and ``mix_end``. With ``G`` the gradient of
    ``P = D E`` and ``Y = G E^T``, the factors' gradients need ``grad_D D^T = Y D^T`` and
    ``grad_E E^T = D^T Y``: three matmuls in all.
    """

    @staticmethod
    def forward(ctx, keep: Tensor, eta: Tensor, theta: Tensor, last: Tensor):
        D, E = segment_products(keep), segment_products(eta)
        P = D @ E
        mix = P * theta.unsqueeze(-2)
        n = torch.arange(last.shape[0], device=last.device)
        ctx.save_for_backward(D, E, P, eta, theta, last)
        return mix, P[..., 0] * eta[..., :1], mix[:, :, n, last]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mix: Tensor, grad_carry: Tensor, grad_mix_end: Tensor):
        D, E, P, eta, theta, last = ctx.saved_tensors
        n = torch.arange(last.shape[0], device=last.device)
        P_end = P[:, :, n, last]
        grad_theta = (grad_mix * P).sum(-2) + grad_mix_end * P_end
        G = grad_mix * theta.unsqueeze(-2)
        G[:, :, n, last] += grad_mix_end * theta
        G[..., 0] += grad_carry * eta[..., :1]
        Y = G @ E.mT
        grad_keep = _grad_of_factors(D, Y @ D.mT)
        grad_eta = _grad_of_factors(E, D.mT @ Y)
        grad_eta[..., 0] += (grad_carry * P[..., 0]).sum(-1)
        return grad_keep, grad_eta, grad_theta, None


def _reverse_exclusive_cumprod(x: Tensor) -> Tensor:
    """``out[..., j] = prod_{l > j} x[..., l]`` (1 for the last position)."""
    shifted = F.pad(x[..., 1:], (0, 1), value=1.0)
    return shifted.flip(-1).cumprod(-1).flip(-1)


def chunk_coefficients(theta: Tensor, eta: Tensor, alpha: Tensor, chunk_size: int) -> ChunkCoefficients:
    """Coefficients of all chunks from gates ``(B, H, T)``; the last chunk is padded with inert
    tokens (theta=0, eta=1, alpha=0) whose columns are zero and whose rows are never read."""
    B, H, T = theta.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T

    def chunks(gate: Tensor, inert: float) -> Tensor:
        # Contiguous: gates split off a (B, T, 3H) projection are transposed views, and every
        # C x C tensor built from them would inherit that layout (and be copied by each matmul).
        return F.pad(gate, (0, pad), value=inert).contiguous().view(B, H, N, C)

    theta, keep, eta = chunks(theta, 0.0), chunks(1 - alpha, 1.0), chunks(eta, 1.0)

    # Row of each chunk's last real token: C-1, except in a partial final chunk.
    last = torch.full((N,), C - 1, dtype=torch.long, device=theta.device)
    last[-1] = (T - 1) % C
    n = torch.arange(N, device=theta.device)

    mix, carry, mix_end = _GradientMix.apply(keep, eta, theta, last)
    beta, momentum = torch.cumprod(keep, -1), torch.cumprod(eta, -1)  # only C per chunk
    # E_Lj = prod_{j<l<=L} eta_l: the padding (eta = 1) makes the product to the chunk's end
    # equal the product to its last real token L, and theta = 0 zeroes the padded columns.
    surprise_end = _reverse_exclusive_cumprod(eta) * theta
    return ChunkCoefficients(
        beta=beta,
        carry=carry,
        mix=mix,
        beta_end=beta[:, :, n, last],
        carry_end=carry[:, :, n, last],
        momentum_end=momentum[:, :, n, last],
        mix_end=mix_end,
        surprise_end=surprise_end,
    )
