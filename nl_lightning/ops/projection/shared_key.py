"""DGD update of several MLP memories that share one key, value and gate stream (HOPE's projections).

HOPE's self-modifying projections (k, v, η, α) are four residual-MLP memories written with the
same normalised key, value and gates, and only their end-of-chunk state is ever read: the next
chunk's projections come from it. Running them as four "heads" of the general chunk kernel
recomputes everything that depends on the key alone four times and builds read-outs that are
thrown away. This kernel computes one chunk's state update only:

* The inner layers W2 of all memories act on the same keys, so they are stacked into one
  (M·Dh, D) matrix: every product with k or v is one matmul, with no broadcast copies, and one
  key Gram matrix and unit-triangular system serve all memories.
* No read-outs, so the UT form is used "transposed". With r = T⁻¹ rhs the end state is
  ``S_L = γ_L S_0 + rhsᵀ Y`` with ``Y = T⁻ᵀ (ρ ⊙ X)`` (ρ_i = γ_L/γ_i, X the layer inputs): the
  triangular solve runs on the layer inputs (width Dh for W1) instead of the update vectors
  (width D), and ``rhs = −η ⊙ δ − ηγ_prev ⊙ X S_0ᵀ`` folds into
  ``S_L = S_0 (γ_L I − Xᵀ diag(ηγ_prev) Y) − (η ⊙ δ)ᵀ Y``, so W1's pre-activations ``h W1ᵀ``
  are never formed on their own.

The result is the state ``chunk_dgd_memory`` returns for the same memories with the key, value
and gates repeated per memory and ``chunk_size >= L`` (one chunk); ``tests/ops`` checks it
against the token-by-token reference in forward and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nl_lightning.ops.activations import silu_grad
from nl_lightning.ops.dgd.chunk import chunk_decays


def shared_key_mlp_update(k, v, eta, alpha, state):
    """One chunk's DGD update of M MLP memories driven by a shared stream.

    Args:
        k, v: (B, L, D) keys and values, the same for every memory.
        eta, alpha: (B, L) gates, the same for every memory.
        state: (W1, W2) with W1 (B, M, D, Dh), W2 (B, M, Dh, D): the memories at the chunk start.

    Returns:
        (W1, W2) after the L tokens, every gradient taken at the chunk-start state.
    """
    w1, w2 = state
    memories, hidden_dim = w2.shape[1], w2.shape[2]
    log_gamma, log_gamma_prev, prev_ratio, ratio = chunk_decays(alpha)  # (B, L), (B, L, L)
    gamma_end = log_gamma[:, -1].exp()  # γ_L
    eta_prev = eta * log_gamma_prev.exp()  # η_t γ_{t-1}
    last = ratio[:, -1, :, None]  # ρ_i = γ_L / γ_i, (B, L, 1)

    w2_stacked = w2.flatten(1, 2)  # (B, M·Dh, D): every memory's W2 applied to k in one matmul
    pre, pre_v = (x @ w2_stacked.mT for x in (k, v))  # (B, L, M·Dh)
    hidden = _per_memory(F.silu(pre), memories)  # W1's inputs, (B, M, L, Dh)
    # δ1 = dL/d(W1 h) = 2 (k + W1 h − v̂), v̂ = v + W1 silu(W2 v): one matmul for both W1 terms.
    delta1 = 2 * ((hidden - _per_memory(F.silu(pre_v), memories)) @ w1.mT + (k - v)[:, None])
    delta2 = silu_grad(pre) * _side_by_side(delta1 @ w1)  # dL/d(W2 k), (B, L, M·Dh)

    # W2: shared inputs k, one system T2 = I + η_t (γ_{t-1}/γ_i) k_t·k_i for every memory.
    y2 = _transposed_solve(k, eta, prev_ratio, last * k)  # T2⁻ᵀ (ρ ⊙ k), (B, L, D)
    rhs2 = -eta[..., None] * delta2 - eta_prev[..., None] * pre
    new_w2 = gamma_end[:, None, None] * w2_stacked + rhs2.mT @ y2

    # W1: per-memory inputs h, one system per memory, solved on the Dh-wide inputs.
    eta_m, eta_prev_m = eta[:, None], eta_prev[:, None, :, None]
    y1 = _transposed_solve(hidden, eta_m, prev_ratio[:, None], last[:, None] * hidden)  # (B, M, L, Dh)
    mix = hidden.mT @ (eta_prev_m * y1)  # Xᵀ diag(η γ_prev) Y, (B, M, Dh, Dh)
    eye = torch.eye(hidden_dim, dtype=mix.dtype, device=mix.device)
    new_w1 = w1 @ (gamma_end[:, None, None, None] * eye - mix) - (eta_m[..., None] * delta1).mT @ y1
    return new_w1, new_w2.unflatten(1, (memories, hidden_dim))


def _transposed_solve(x, eta, prev_ratio, rhs):
    """Y = T⁻ᵀ rhs for the UT system T = I + η_t (γ_{t-1}/γ_i) (x_t·x_i) of inputs x (..., L, Din).

    Tᵀ is built directly (η on the columns) so the upper-triangular solve reads a contiguous matrix.
    """
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    system_t = eye + eta[..., None, :] * prev_ratio.mT * (x @ x.mT)
    return torch.linalg.solve_triangular(system_t, rhs, upper=True, unitriangular=True)


def _per_memory(x, memories):
    """(B, L, M·W) -> (B, M, L, W): each memory's columns as its own batch entry."""
    return x.unflatten(-1, (memories, -1)).transpose(1, 2)


def _side_by_side(x):
    """(B, M, L, W) -> (B, L, M·W): the M memories' columns next to each other."""
    return x.transpose(1, 2).flatten(2)
