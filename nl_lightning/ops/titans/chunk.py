"""Chunk-parallel Titans memory: the same recurrence as ``naive.py``, a chunk of tokens at a time.

Inside a chunk every gradient is taken at the chunk-start state ``(W0, S0)``, so token j's
gradient is a known rank-1 matrix ``G_j = u_j x_j^T`` (``common.loss_grad_factors``). The
token-by-token recurrence ``S_i = eta_i S_{i-1} - theta_i G_i``, ``W_i = (1 - alpha_i) W_{i-1} + S_i``
is linear, so it unrolls to (i, j, m index tokens of the chunk)::

    S_i = A_i S0 - sum_{j<=i} E_ij theta_j G_j           A_i = prod_{l<=i} eta_l
    W_i = beta_i W0 + c_i S0 - sum_{j<=i} P_ij theta_j G_j
                                                       beta_i = prod_{l<=i} (1 - alpha_l)
    E_ij = prod_{j<l<=i} eta_l,  D_im = prod_{m<l<=i} (1 - alpha_l)
    c = D A,  P = D E     (C x C lower-triangular matmuls: the "parallel scan" of the momentum)

and the read-out of every chunk token needs no per-token weight matrix:
``W_i z_i = beta_i W0 z_i + c_i S0 z_i - sum_j P_ij theta_j u_j (x_j . z_i)``.
All coefficients depend only on the gates, so they are computed for every chunk at once; only
the state hand-over from one chunk to the next is sequential.

Numerics: the segment products ``E`` and ``D`` are formed directly as masked cumulative products,
never as ratios of cumulative products, which underflow to 0/0 over long chunks with strong decay.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import MemoryState, Weights, check_inputs, initial_state, loss_grad_factors


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

    Built as a cumulative product over a masked copy (factors with ``l <= m`` replaced by 1), so
    no division by a cumulative product that may have underflowed.
    """
    C = x.shape[-1]
    idx = torch.arange(C, device=x.device)
    after_m = idx[:, None] > idx[None, :]  # [l, m]: factor l belongs to the segment after m
    factors = torch.where(after_m, x.unsqueeze(-1), torch.ones((), dtype=x.dtype, device=x.device))
    lower = (idx[:, None] >= idx[None, :]).to(x.dtype)
    return torch.cumprod(factors, dim=-2) * lower


def chunk_coefficients(theta: Tensor, eta: Tensor, alpha: Tensor, chunk_size: int) -> ChunkCoefficients:
    """Coefficients of all chunks from gates ``(B, H, T)``; the last chunk is padded with inert
    tokens (theta=0, eta=1, alpha=0) whose columns are zero and whose rows are never read."""
    B, H, T = theta.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    theta = F.pad(theta, (0, pad), value=0.0).view(B, H, N, C)
    eta = F.pad(eta, (0, pad), value=1.0).view(B, H, N, C)
    keep = F.pad(1 - alpha, (0, pad), value=1.0).view(B, H, N, C)

    beta = torch.cumprod(keep, dim=-1)
    momentum = torch.cumprod(eta, dim=-1)
    D = segment_products(keep)
    E = segment_products(eta)
    carry = (D @ momentum.unsqueeze(-1)).squeeze(-1)
    mix = (D @ E) * theta.unsqueeze(-2)

    # Row of each chunk's last real token: C-1, except in a partial final chunk.
    last = torch.full((N,), C - 1, dtype=torch.long, device=theta.device)
    last[-1] = (T - 1) % C
    n = torch.arange(N, device=theta.device)
    return ChunkCoefficients(
        beta=beta,
        carry=carry,
        mix=mix,
        beta_end=beta[:, :, n, last],
        carry_end=carry[:, :, n, last],
        momentum_end=momentum[:, :, n, last],
        mix_end=mix[:, :, n, last],
        surprise_end=E[:, :, n, last] * theta,
    )


def _layer_chunk(W: Tensor, S: Tensor, u: Tensor, x: Tensor, z: Tensor, cf: ChunkCoefficients):
    """One memory weight over one chunk: read-outs ``W_i z_i`` for all i, and the end state.

    ``W, S: (B, H, Dout, Din)`` chunk-start weight and momentum; ``u: (B, H, C, Dout)`` and
    ``x: (B, H, C, Din)`` the gradient factors (``G_j = u_j x_j^T``); ``z: (B, H, C, Din)`` inputs.
    """
    mixed = (cf.mix * (z @ x.mT)) @ u  # sum_j P_ij theta_j (x_j . z_i) u_j, a C x C matmul
    out = cf.beta.unsqueeze(-1) * (z @ W.mT) + cf.carry.unsqueeze(-1) * (z @ S.mT) - mixed
    W_end = (
        cf.beta_end[..., None, None] * W
        + cf.carry_end[..., None, None] * S
        - (cf.mix_end.unsqueeze(-1) * u).mT @ x
    )
    S_end = cf.momentum_end[..., None, None] * S - (cf.surprise_end.unsqueeze(-1) * u).mT @ x
    return out, W_end, S_end


def chunk_step(
    kind: str,
    weights: tuple[Tensor, ...],
    momentum: tuple[Tensor, ...],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cf: ChunkCoefficients,
):
    """Process one chunk (``q, k, v: (B, H, C, D)``) from its start state; return ``y`` and the
    end state. This is the unit that ``fused.py`` compiles."""
    factors = loss_grad_factors(kind, weights, k, v)
    if kind == "linear":
        ((u, x),) = factors
        y, W, S = _layer_chunk(weights[0], momentum[0], u, x, q, cf)
        return y, (W,), (S,)
    (u1, a), (u2, _) = factors
    h, W2, S2 = _layer_chunk(weights[1], momentum[1], u2, k, q, cf)  # inner layer first
    o, W1, S1 = _layer_chunk(weights[0], momentum[0], u1, a, F.silu(h), cf)
    return q + o, (W1, W2), (S1, S2)


def run_chunks(
    kind: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coefficients: ChunkCoefficients,
    start: MemoryState,
    chunk_size: int,
    step: Callable = chunk_step,
) -> tuple[Tensor, MemoryState]:
    """Hand the state from chunk to chunk; ``step`` may be the eager or the compiled chunk step."""
    B, H, T, _ = q.shape
    C = chunk_size
    N = coefficients.beta.shape[2]
    pad = N * C - T
    # unbind, not indexing chunk by chunk: the backward of one unbind stacks all chunk gradients
    # once, whereas the backward of each index op writes into a zero tensor of the full size,
    # which makes the backward quadratic in the number of chunks.
    qs, ks, vs = (F.pad(t, (0, 0, 0, pad)).view(B, H, N, C, t.shape[-1]).unbind(2) for t in (q, k, v))
    per_chunk = [ChunkCoefficients(*parts) for parts in zip(*(c.unbind(2) for c in coefficients))]
    weights, momentum = start
    ys = []
    for q_n, k_n, v_n, cf in zip(qs, ks, vs, per_chunk):
        y, weights, momentum = step(kind, weights, momentum, q_n, k_n, v_n, cf)
        ys.append(y)
    y = torch.stack(ys, dim=2).flatten(2, 3)[:, :, :T]
    return y, MemoryState(tuple(weights), tuple(momentum))


def chunk_titans_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Weights,
    *,
    kind: str = "linear",
    chunk_size: int = 64,
    state: MemoryState | None = None,
) -> tuple[Tensor, MemoryState]:
    """Chunk-parallel Titans memory; same arguments and results as ``naive_titans_memory``."""
    ws = check_inputs(q, k, v, theta, eta, alpha, weights, kind, chunk_size, state)
    C = min(chunk_size, q.shape[2])  # one chunk longer than the sequence == the whole sequence
    coefficients = chunk_coefficients(theta, eta, alpha, C)
    return run_chunks(kind, q, k, v, coefficients, initial_state(ws, q.shape[0], state), C)
