"""DGD update of several MLP memories that share one key, value and gate stream (HOPE's projections).

HOPE's self-modifying projections (k, v, η, α) are four residual-MLP memories written with the
same normalised key, value and gates, and only their end-of-chunk state is ever read: the next
chunk's projections come from it. Running them as four "heads" of the general chunk kernel
recomputes everything that depends on the key alone four times and builds read-outs that are
thrown away. This kernel computes one chunk's state update only, with

* one key Gram matrix and one unit-triangular system for the inner layer W2 (its inputs are the
  shared keys), solved for all memories at once (their right-hand sides side by side);
* the chunk-start products ``S_0 x`` reused from the gradient computation;
* no read-outs.

The result is the state ``chunk_dgd_memory`` returns for the same memories with the key, value
and gates repeated per memory and ``chunk_size >= L`` (one chunk); ``tests/ops`` checks it
against the token-by-token reference in forward and gradients.
"""

from __future__ import annotations

import torch

from nl_lightning.ops.dgd.chunk import (
    _chunk_decays,
    delta_system,
    end_state,
    mlp_gradient_factors,
    solve_updates,
)


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
    k, v = k[:, None], v[:, None]  # broadcast over the M memories
    decays = _chunk_decays(alpha[:, None])  # (B, 1, ...): shared by the memories and both layers
    eta = eta[:, None]
    pre, hidden, hidden_w1, delta1, delta2 = mlp_gradient_factors(w1, w2, k, v)

    # W2's inputs are the shared keys: one system for all memories. Their right-hand sides go side
    # by side as extra columns of one solve, (B, L, M·Dh), instead of M solves of one system each.
    r2 = solve_updates(
        delta_system(k, eta, decays)[:, 0], _side_by_side(-eta[..., None] * delta2), eta[:, 0],
        tuple(d[:, 0] for d in decays), _side_by_side(pre),
    )
    r2 = r2.unflatten(2, (w2.shape[1], -1)).transpose(1, 2)  # back to (B, M, L, Dh)
    new_w2 = end_state(w2, k, r2, decays)

    r1 = solve_updates(delta_system(hidden, eta, decays), -eta[..., None] * delta1, eta, decays, hidden_w1)
    new_w1 = end_state(w1, hidden, r1, decays)
    return new_w1, new_w2


def _side_by_side(x):
    """(B, M, L, W) -> (B, L, M·W): the M memories' columns next to each other."""
    return x.transpose(1, 2).flatten(2)
