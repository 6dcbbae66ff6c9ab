"""Token-by-token reference for HOPE's self-modifying memory: the DGD rule and the delta rule.

This file is the definition the fast versions are tested against, so it favours plain loops and
one line per equation over speed. Tokens are 0-indexed; ``state`` before token t is M_{t-1}.

Every linear layer W of the memory (W for "linear"; W2 then W1 for "mlp") has, at token t, an
input x, an output y = W x and the gradient g = ∂(½ ||M(k_t) − v̂_t||²)/∂y of the inner loss with
respect to that output (the error backpropagated to the layer). The target is v̂_t = M(v_t)
(``target="self"``, the paper's self-made target) or v_t (``target="value"``).

``rule="dgd"`` (the paper's delta gradient descent, SPEC §2):

    W <- W (α_t I − η_t x xᵀ) − η_t ∇_W L,     ∇_W L = 2 g xᵀ,   L = ||M(k_t) − v̂_t||²

``rule="delta"`` (the layer-local normalised delta rule, the models' default):

    W <- W (α_t I − η_l x xᵀ) + η_l (y − g) xᵀ,     η_l = β_t / (||x||² + ε)

Each layer's output is moved toward its one-step target y − g with the NLMS step of adaptive
filters: β_t ∈ (0, 1] is the fraction of the error a token corrects. For the linear memory
y − g = v̂_t, so this is the gated delta rule W (αI − β k̂ k̂ᵀ) + β v̂ k̂ᵀ/||k|| (unit keys: k̂ = k),
and at β = α = 1 one token stores its association exactly (W k = v̂ after the write). For the MLP
memory, W1's target y − g = v̂ − k is exactly what makes M(k) = v̂ with W2 held. W1 writes first and
removes the fraction β'_1 = η_1 ||h||² of the error; W2 gets what is left, normalised by the
curvature of the output in W2's pre-activations (NLMS in pre-activation space, with J = W1 diag σ'(pre)):

    g_2 = (1 − β'_1) Jᵀ (M(k) − v̂) / (||J||_F² + ε_J),     ||J||_F² = Σ_j σ'(pre_j)² ||W1[:, j]||²

so that, to first order, W2's write removes at most the fraction β of what W1 left, and the two
never overshoot together. Both parts are measured (``tests/ops/test_dgd_delta_rule.py``): with
each layer correcting the whole error a β = 1 write left up to 1.45× the error it started from, and
with W2's step not divided by the curvature W2 grew without bound under chunking (norm 2.7e4
after 1,024 random tokens at C = 64, β = 0.5, against 23 at C = 1). At β = 1 the write is W1's
alone, which is the one-shot store. ε_J = 1 (``common.CURVATURE_EPS`` says why not smaller).

Stability bound of the delta rule (any inputs; ``tests/ops/test_dgd_delta_rule.py`` checks it on
repeated keys, large inputs and 16K tokens). The transition A = αI − η_l x xᵀ is symmetric with
eigenvalues α and α − β', β' = η_l ||x||² = β ||x||²/(||x||² + ε) ∈ [0, 1), so with α, β ∈ (0, 1]
its spectral norm is ρ = max(α, |α − β'|) ≤ 1 (a contraction), and for every layer and token

    ||W_t||_F ≤ ρ_t ||W_{t−1}||_F + η_l ||y − g|| ||x||

The state can grow only by what a token writes, and every earlier write decays by ρ ≤ 1: no step
cap and no 1/chunk-size scaling are needed. (The DGD rule has no such bound: its write 2η g xᵀ
grows with the error, and the gradient taken at a stale chunk-start state adds up over the chunk.)

Chunked semantics (chunk size C, t' = t − t mod C), both rules: the target v̂_t, the layer inputs
x, the outputs y and the gradients g are evaluated at the chunk-start state M_{t'−1} (the state
before token t'), while the multiplicative factors (αI − η x xᵀ) act on the running state token by
token. C = 1 is the exact online rule. For the linear memory with ``target="value"`` the delta
rule does not depend on the chunk-start state at all, so every chunk size gives the exact rule.

Inner gradient: v̂_t is held constant inside g (no term through v̂'s own dependence on W), which
is what a stop-gradient on the target inside the inner loss gives. Everything is written in closed
form, so nothing is detached: the outer autograd still flows through v̂_t, the errors, the steps
and every state into the outputs and the initial weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nl_lightning.ops.activations import silu_grad
from nl_lightning.ops.contract import MemoryState
from nl_lightning.ops.dgd.common import CURVATURE_EPS, NLMS_EPS


def _mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product: (..., m, n) @ (..., n) -> (..., m)."""
    return (w @ x.unsqueeze(-1)).squeeze(-1)


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched outer product a bᵀ: (..., m), (..., n) -> (..., m, n)."""
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def nlms_step(beta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The delta rule's step η = β / (||x||² + ε) for layer inputs x (..., n) and β (...)."""
    return beta / (x.pow(2).sum(-1) + NLMS_EPS)


def w2_error_scale(beta, hidden, pre, w1_column_norms):
    """(1 − β'_1) / (||W1 diag σ'(pre)||_F² + ε): the share of W2's error under the delta rule
    (module docstring), for hidden, pre (..., Dh) and the squared column norms of W1 at the chunk
    start, ``W1.pow(2).sum(-2)``, broadcastable to pre."""
    left = 1 - nlms_step(beta, hidden) * hidden.pow(2).sum(-1)  # the error W1's write leaves
    curvature = (silu_grad(pre).pow(2) * w1_column_norms).sum(-1)
    return left / (curvature + CURVATURE_EPS)


def layer_write(w, x, y, g, eta, alpha, rule):
    """One token's write into a linear layer W with input x, chunk-start output y and error g.

    ``eta`` is the gate (η of DGD, β of the delta rule) shaped (..., 1, 1).
    """
    if rule == "dgd":
        return alpha * w - eta * _outer(_mv(w, x), x) - eta * _outer(2 * g, x)
    step = nlms_step(eta[..., 0, 0], x)[..., None, None]
    return alpha * w - step * _outer(_mv(w, x), x) + step * _outer(y - g, x)


def _linear_token(start, state, q, k, v, eta, alpha, rule, target):
    (w0,), (w,) = start, state
    y = _mv(w0, k)
    goal = _mv(w0, v) if target == "self" else v
    w = layer_write(w, k, y, y - goal, eta, alpha, rule)  # g = W k − v̂ at the chunk start
    return _mv(w, q), (w,)


def _mlp_token(start, state, q, k, v, eta, alpha, rule, target):
    (w1_0, w2_0), (w1, w2) = start, state
    pre = _mv(w2_0, k)  # W2's output, at the chunk-start state
    hidden = F.silu(pre)  # W1's input
    hidden_w1 = _mv(w1_0, hidden)  # W1's output
    goal = v + _mv(w1_0, F.silu(_mv(w2_0, v))) if target == "self" else v  # v̂ = M(v) or v
    g1 = k + hidden_w1 - goal  # ∂(½L)/∂(W1 h): the residual passes through
    g2 = silu_grad(pre) * _mv(w1_0.transpose(-1, -2), g1)  # ∂(½L)/∂(W2 k)
    if rule == "delta":
        g2 = g2 * w2_error_scale(eta[..., 0, 0], hidden, pre, w1_0.pow(2).sum(-2))[..., None]
    w2 = layer_write(w2, k, pre, g2, eta, alpha, rule)
    w1 = layer_write(w1, hidden, hidden_w1, g1, eta, alpha, rule)
    return q + _mv(w1, F.silu(_mv(w2, q))), (w1, w2)


_TOKEN_STEPS = {"linear": _linear_token, "mlp": _mlp_token}


def naive_dgd_memory(q, k, v, eta, alpha, start: MemoryState, *, kind: str, chunk_size: int, rule="dgd", target="self"):
    """Run the memory over a sequence one token at a time.

    Args:
        q, k, v: (B, H, T, D) queries, keys and values.
        eta, alpha: (B, H, T) step gate (η of DGD, β of the delta rule) and retention, in (0, 1].
        start: per-batch weights before the first token: ``(W,)`` with W (B, H, D, D) for
            ``kind="linear"``; ``(W1, W2)`` with W1 (B, H, D, Dh), W2 (B, H, Dh, D) for ``"mlp"``.
        kind: ``"linear"`` or ``"mlp"``.
        chunk_size: tokens per chunk whose gradients share the chunk-start state (1 = online).
        rule: ``"dgd"`` or ``"delta"`` (module docstring).
        target: ``"self"`` (v̂ = M(v)) or ``"value"`` (v).

    Returns:
        o: (B, H, T, D), o_t = M_t(q_t) read after token t's update; and the state after the last
        token, in the layout of ``start``.
    """
    token_step = _TOKEN_STEPS[kind]
    state = tuple(start.weights)
    outputs = []
    for t in range(q.shape[2]):
        if t % chunk_size == 0:
            anchor = state  # the chunk start: every target and gradient in the chunk is taken here
        o_t, state = token_step(
            anchor,
            state,
            q[:, :, t],
            k[:, :, t],
            v[:, :, t],
            eta[:, :, t, None, None],
            alpha[:, :, t, None, None],
            rule,
            target,
        )
        outputs.append(o_t)
    return torch.stack(outputs, dim=2), MemoryState(state)
