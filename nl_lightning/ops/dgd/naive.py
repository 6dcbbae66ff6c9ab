"""Token-by-token reference for HOPE's self-modifying memory with the DGD update rule.

This file is the definition the fast versions are tested against, so it favours plain loops and
one line per equation over speed. Tokens are 0-indexed; ``state`` before token t is M_{t-1}.

For every linear layer W of the memory, with layer input x at token t:

    W <- W (alpha_t I - eta_t x xᵀ) - eta_t grad_W L,     L = ||M(k_t) - v̂_t||²,   v̂_t = M(v_t)

Chunked semantics (chunk size C, t' = t - t mod C): the target v̂_t, the gradient grad_W L and the
layer inputs x are evaluated at the chunk-start state M_{t'-1} (the state before token t'), while
the multiplicative factors (alpha I - eta x xᵀ) act on the running state token by token. C = 1 is
the exact online rule.

Inner gradient: v̂_t is held constant inside grad_W L (no term through v̂'s own dependence on W),
which is what a stop-gradient on the target inside the inner loss gives. The gradient is written in
closed form, so nothing is detached: the outer autograd still flows through v̂_t, the error and every
state into the outputs and the initial weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nl_lightning.ops.activations import silu_grad


def _mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product: (..., m, n) @ (..., n) -> (..., m)."""
    return (w @ x.unsqueeze(-1)).squeeze(-1)


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched outer product a bᵀ: (..., m), (..., n) -> (..., m, n)."""
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def _dgd(w, x, delta, eta, alpha):
    """One DGD step of a linear layer: W (alpha I - eta x xᵀ) - eta delta xᵀ (delta xᵀ = grad_W L)."""
    return alpha * w - eta * _outer(_mv(w, x), x) - eta * _outer(delta, x)


def _linear_token(start, state, q, k, v, eta, alpha):
    (w0,), (w,) = start, state
    # dL/d(M(k)) = 2 (W k - v̂) with v̂ = W v, both at the chunk-start state.
    delta = 2 * (_mv(w0, k) - _mv(w0, v))
    w = _dgd(w, k, delta, eta, alpha)
    return _mv(w, q), (w,)


def _mlp_token(start, state, q, k, v, eta, alpha):
    (w1_0, w2_0), (w1, w2) = start, state
    pre = _mv(w2_0, k)
    hidden = F.silu(pre)  # input of the W1 layer, at the chunk-start state
    target = v + _mv(w1_0, F.silu(_mv(w2_0, v)))  # v̂ = M(v)
    delta1 = 2 * (k + _mv(w1_0, hidden) - target)  # dL/d(W1 h), the residual passes through
    delta2 = silu_grad(pre) * _mv(w1_0.transpose(-1, -2), delta1)  # dL/d(W2 k)
    w2 = _dgd(w2, k, delta2, eta, alpha)
    w1 = _dgd(w1, hidden, delta1, eta, alpha)
    return q + _mv(w1, F.silu(_mv(w2, q))), (w1, w2)


_TOKEN_STEPS = {"linear": _linear_token, "mlp": _mlp_token}


def naive_dgd_memory(q, k, v, eta, alpha, state, *, kind: str, chunk_size: int):
    """Run the memory over a sequence one token at a time.

    Args:
        q, k, v: (B, H, T, D) queries, keys and values.
        eta, alpha: (B, H, T) learning rate and retention, expected in (0, 1).
        state: per-batch weights before the first token: ``(W,)`` with W (B, H, D, D) for
            ``kind="linear"``; ``(W1, W2)`` with W1 (B, H, D, Dh), W2 (B, H, Dh, D) for ``"mlp"``.
        kind: ``"linear"`` or ``"mlp"``.
        chunk_size: tokens per chunk whose gradients share the chunk-start state (1 = online).

    Returns:
        o: (B, H, T, D), o_t = M_t(q_t) read after token t's update; and the state after the last
        token, in the same layout as ``state``.
    """
    token_step = _TOKEN_STEPS[kind]
    state = tuple(state)
    outputs = []
    for t in range(q.shape[2]):
        if t % chunk_size == 0:
            start = state
        o_t, state = token_step(
            start,
            state,
            q[:, :, t],
            k[:, :, t],
            v[:, :, t],
            eta[:, :, t, None, None],
            alpha[:, :, t, None, None],
        )
        outputs.append(o_t)
    if not outputs:
        return q.new_empty(q.shape), state
    return torch.stack(outputs, dim=2), state
