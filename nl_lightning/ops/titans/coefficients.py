"""Gate-only coefficients of the chunk-parallel Titans memory (see ``chunk.py`` for the algebra).

Inside a chunk (i, j, m index its tokens) the memory after token i is::

    S_i = A_i S0 - sum_{j<=i} E_ij theta_j G_j           A_i = prod_{l<=i} eta_l
    W_i = beta_i W0 + c_i S0 - sum_{j<=i} P_ij theta_j G_j
                                                       beta_i = prod_{l<=i} (1 - alpha_l)
    E_ij = prod_{j<l<=i} eta_l,  D_im = prod_{m<l<=i} (1 - alpha_l)
    c = D A,  P = D E     (the momentum's decay E seen through the weights' decay D)

Since ``D_ii = 1`` and ``D_im = keep_i D_{i-1,m}`` (``keep = 1 - alpha``), the rows of ``P`` obey
the recurrence ``P_i = keep_i P_{i-1} + E_i``, and those of ``E`` obey ``E_i = eta_i E_{i-1} + e_i``
(``e_i`` the i-th unit row). ``P`` is built by this row scan, C steps on all chunks at once,
instead of as the C x C x C matmul ``D E``: the scan touches each entry of ``P`` and ``E`` once
(``O(C^2)`` per chunk) and ``D`` is never formed. Its backward is the reverse scan (see
``_MomentumScan``), again ``O(C^2)``; the C-step Python loops cost less than the four C^3 matmuls
they replace already at C = 64 (2-2.5x faster for the coefficients' forward+backward on one
CPU thread).

Numerics: no ratios of cumulative products (they underflow to 0/0 over long chunks with strong
decay; differences of cumulative log-sums avoid the 0/0 but cannot represent a gate of exactly
0 and lose float32 precision), and no division anywhere, forward or backward, so gates of
exactly 0 or 1 get exact values and gradients.
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
    decay_mix: Tensor  # (B, H, N, C, C)  P_ij: weight of token j's scaled gradient theta_j G_j in W_i
    theta: Tensor  # (B, H, N, C)   theta_j, chunked (0 on padding)
    beta_end: Tensor  # (B, H, N)
    carry_end: Tensor  # (B, H, N)
    momentum_end: Tensor  # (B, H, N)  A_L: weight of S0 in the end momentum
    mix_end: Tensor  # (B, H, N, C)    P_Lj theta_j: weight of G_j in the end weights
    surprise_end: Tensor  # (B, H, N, C)  E_Lj theta_j: weight of G_j in the end momentum

    def mix(self) -> Tensor:
        """``P_ij theta_j`` (B, H, N, C, C): the weight of token j's gradient in ``W_i``.

        The chunk kernel never forms it (it scales the keys by theta instead, a C x D product
        rather than a C x C one); the Triton kernel takes it as one input. Differentiable.
        """
        return self.decay_mix * self.theta.unsqueeze(-2)


class _MomentumScan(torch.autograd.Function):
    """``P = D E`` built by the row scan ``P_i = keep_i P_{i-1} + E_i``, ``E_i = eta_i E_{i-1} + e_i``,
    plus the two things read off it: ``carry = eta_0 P[:, 0]`` (``c = D A`` with
    ``A_m = eta_0 E_m0``) and ``P_end``, the row of each chunk's last real token.

    Backward written out as the reverse scan: with ``G`` the gradient of ``P``, the total
    gradient of row i, ``HP_i = G_i + keep_{i+1} HP_{i+1}``, gives ``grad_keep_i = HP_i . P_{i-1}``;
    the rows of ``E`` receive ``HE_i = HP_i + eta_{i+1} HE_{i+1}``, which gives
    ``grad_eta_i = HE_i . E_{i-1}``. Autograd through the loop would record 2C small ops and fill a
    zero C x C gradient for each of ``carry`` and ``P_end``.
    """

    @staticmethod
    def forward(ctx, keep: Tensor, eta: Tensor, last: Tensor):
        C = keep.shape[-1]
        E = keep.new_zeros(*keep.shape, C)
        E.diagonal(dim1=-2, dim2=-1).fill_(1)
        P = torch.zeros_like(E)
        P[..., 0, 0].fill_(1)  # not ``= 1``: a host-to-device copy (see chunk_coefficients)
        keep_, eta_ = keep.unsqueeze(-1), eta.unsqueeze(-1)
        for i in range(1, C):
            # Rows are lower-triangular: only the first i (E) and i+1 (P) entries are nonzero.
            torch.mul(E[..., i - 1, :i], eta_[..., i, :], out=E[..., i, :i])
            row = slice(None, i + 1)
            torch.addcmul(E[..., i, row], keep_[..., i, :], P[..., i - 1, row], out=P[..., i, row])
        ctx.save_for_backward(E, P, keep, eta, last)
        return P, P[..., 0] * eta[..., :1], P.gather(-2, _last_index(last, P, -2)).squeeze(-2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_P: Tensor, grad_carry: Tensor, grad_P_end: Tensor):
        E, P, keep, eta, last = ctx.saved_tensors
        C = keep.shape[-1]
        # G (the total gradient of P), turned into HP in place by the scan below.
        HP = grad_P.clone(memory_format=torch.contiguous_format)
        HP.scatter_add_(-2, _last_index(last, HP, -2), grad_P_end.unsqueeze(-2))
        HP[..., 0] += grad_carry * eta[..., :1]
        HE = torch.empty_like(HP)
        HE[..., C - 1, :] = HP[..., C - 1, :]
        keep_, eta_ = keep.unsqueeze(-1), eta.unsqueeze(-1)
        for i in range(C - 2, -1, -1):
            HP[..., i, :].addcmul_(keep_[..., i + 1, :], HP[..., i + 1, :])
            torch.addcmul(HP[..., i, :], eta_[..., i + 1, :], HE[..., i + 1, :], out=HE[..., i, :])
        # Row 0 has no predecessor (P_{-1} = E_{-1} = 0): the first gate of a chunk starts no product.
        grad_keep = F.pad((HP[..., 1:, :] * P[..., :-1, :]).sum(-1), (1, 0))
        grad_eta = F.pad((HE[..., 1:, :] * E[..., :-1, :]).sum(-1), (1, 0))
        grad_eta[..., 0] += (grad_carry * P[..., 0]).sum(-1)
        return grad_keep, grad_eta, None


def _last_index(last: Tensor, x: Tensor, dim: int) -> Tensor:
    """Index for ``gather``/``scatter_add_`` along ``dim`` of x (B, H, N, ...) that picks position
    ``last[n]`` of chunk n. gather rather than ``x[:, :, n, last]``: advanced indexing's backward is
    an accumulating ``index_put_``, which a CUDA graph cannot record (gather's is a scatter_add)."""
    shape = [1] * x.dim()
    shape[2] = last.shape[0]
    size = list(x.shape)
    size[dim] = 1
    return last.view(shape).expand(size)


def _at_last(x: Tensor, last: Tensor) -> Tensor:
    """(B, H, N, C) -> (B, H, N): each chunk's entry at its last real token."""
    return x.gather(-1, _last_index(last, x, -1)).squeeze(-1)


class _Cumprod(torch.autograd.Function):
    """``torch.cumprod(x, -1)`` with a backward that never reads a value on the host.

    torch's own cumprod backward on CUDA synchronises with the host (seen with
    ``torch.cuda.set_sync_debug_mode``, torch 2.11): it stalls the launch queue in eager mode and
    cannot be recorded in a CUDA graph. With ``y = cumprod(x)`` the gradient is
    ``dx_i = y_{i-1} R_i`` where ``R_i = sum_{j>=i} g_j prod_{i<l<=j} x_l`` obeys the reverse
    recurrence ``R_i = g_i + x_{i+1} R_{i+1}``. That linear recurrence runs as a doubling scan
    (log2 C steps of whole-tensor ops): products only, no division, so zeros in x get exact
    gradients, and on CPU it is faster than torch's backward (0.23 vs 0.41 ms at (4, 4, 16, 64)).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.cumprod(x, -1)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        x, y = ctx.saved_tensors
        # After the step of stride s, R_i sums its first 2s terms and A_i = prod_{i<l<=i+2s} x_l
        # (0 past the end, where there is nothing left to add).
        R, A = grad, F.pad(x[..., 1:], (0, 1))
        stride = 1
        while stride < x.shape[-1]:
            R = torch.addcmul(R, A, F.pad(R[..., stride:], (0, stride)))
            A = A * F.pad(A[..., stride:], (0, stride))
            stride *= 2
        return F.pad(y[..., :-1], (1, 0), value=1.0) * R


def _cumprod(x: Tensor) -> Tensor:
    """Cumulative product over the last dimension (``_Cumprod``)."""
    return _Cumprod.apply(x)


def _reverse_exclusive_cumprod(x: Tensor) -> Tensor:
    """``out[..., j] = prod_{l > j} x[..., l]`` (1 for the last position)."""
    shifted = F.pad(x[..., 1:], (0, 1), value=1.0)
    return _cumprod(shifted.flip(-1)).flip(-1)


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
    # fill_, not ``last[-1] = ...``: assigning a Python number copies it from host memory, which a
    # CUDA graph cannot record (python -m benchmarks.throughput --cuda-graph).
    last[-1].fill_((T - 1) % C)

    decay_mix, carry, decay_mix_end = _MomentumScan.apply(keep, eta, last)
    beta, momentum = _cumprod(keep), _cumprod(eta)  # only C per chunk
    # E_Lj = prod_{j<l<=L} eta_l: the padding (eta = 1) makes the product to the chunk's end
    # equal the product to its last real token L, and theta = 0 zeroes the padded columns.
    surprise_end = _reverse_exclusive_cumprod(eta) * theta
    return ChunkCoefficients(
        beta=beta,
        carry=carry,
        decay_mix=decay_mix,
        theta=theta,
        beta_end=_at_last(beta, last),
        carry_end=_at_last(carry, last),
        momentum_end=_at_last(momentum, last),
        mix_end=decay_mix_end * theta,
        surprise_end=surprise_end,
    )
