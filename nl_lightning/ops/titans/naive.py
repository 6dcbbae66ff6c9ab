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

from nl_lightning.ops.contract import MemoryState, memory_read

from .common import loss_grad_factors


def naive_titans_memory(q, k, v, theta, eta, alpha, start: MemoryState, *, kind: str, chunk_size: int):
    """Reference Titans memory: ``q, k: (B, H, T, Dk)``, ``v: (B, H, T, Dv)``, gates ``(B, H, T)``,
    from the per-batch ``start`` state. Returns ``y: (B, H, T, Dv)`` and the end :class:`MemoryState`."""
    W, S = list(start.weights), list(start.momentum)
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
        ys.append(memory_read(kind, W, qt))
    return torch.cat(ys, dim=2), MemoryState(tuple(W), tuple(S))
