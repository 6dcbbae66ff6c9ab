"""Token-by-token reference for the Titans neural-memory update. Slow, obvious, and the definition.

For every token t (per batch element and head)::

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)      # surprise with momentum
    M_t = (1 - alpha_t) M_{t-1} + S_t                            # forgetting, every weight
    y_t = M_t(q_t)                                               # read-out after the update

with ``l(M; k, v) = ||M(k) - v||^2`` and ``t' = t - t mod chunk_size`` the start of t's chunk:
gradients inside a chunk are all taken at the state the chunk started from, which is what makes
the chunk-parallel form possible. ``chunk_size=1`` is exact online gradient descent.

The gradient is written out explicitly (rank-1 outer products, see ``common.loss_grad_factors``)
instead of calling autograd inside the loop, so the whole recurrence is one differentiable
expression in q, k, v, the gates and the initial weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import MemoryState, Weights, check_inputs, initial_state, loss_grad_factors, memory_forward


def naive_titans_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Weights,
    *,
    kind: str = "linear",
    chunk_size: int = 1,
    state: MemoryState | None = None,
) -> tuple[Tensor, MemoryState]:
    """Reference Titans memory: ``q, k: (B, H, T, Dk)``, ``v: (B, H, T, Dv)``, gates ``(B, H, T)``.

    Returns ``y: (B, H, T, Dv)`` and the final :class:`MemoryState`. When ``state`` is given the
    memory starts from it instead of from ``weights`` (which still fix kind and shapes).
    """
    ws = check_inputs(q, k, v, theta, eta, alpha, weights, kind, chunk_size, state)
    W, S = initial_state(ws, q.shape[0], state)
    W, S = list(W), list(S)
    anchor = W
    ys = []
    # Tokens via unbind rather than indexing: the backward of one unbind is a single stack, the
    # backward of T index ops would fill T full-size zero tensors (quadratic in T).
    tokens = zip(*(x.unsqueeze(3).unbind(2) for x in (q, k, v, theta, eta, alpha)))
    for t, (qt, kt, vt, th, et, al) in enumerate(tokens):  # qt, kt, vt: (B, H, 1, D)
        if t % chunk_size == 0:
            anchor = list(W)  # chunk start: every gradient in this chunk is taken here
        th, et, al = th[..., None], et[..., None], al[..., None]  # (B, H, 1, 1) per-token gates
        for i, (u, x) in enumerate(loss_grad_factors(kind, anchor, kt, vt)):
            grad = u.mT @ x  # (B, H, Dout, Din): the rank-1 gradient of this token
            S[i] = et * S[i] - th * grad
            W[i] = (1 - al) * W[i] + S[i]
        ys.append(memory_forward(kind, W, qt))
    return torch.cat(ys, dim=2), MemoryState(tuple(W), tuple(S))
