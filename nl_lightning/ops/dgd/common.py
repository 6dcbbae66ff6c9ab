"""Definitions shared by the DGD implementations: the memory kinds, the fused kernels' item layout."""

from __future__ import annotations

# Name -> number of weight matrices in a memory of that kind.
#   "linear": M(z) = W z,                 state (W,)       with W  (D, D)
#   "mlp":    M(z) = z + W1 silu(W2 z),   state (W1, W2)   with W1 (D, Dh), W2 (Dh, D)
KINDS = {"linear": 1, "mlp": 2}


def per_item_loop(function):
    """A ``chunk_loop`` for ``chunk_dgd_memory`` that hands the chunked (B, H, N, C, ...) inputs
    and state to ``function.apply`` as B·H items (the fused kernels' layout) and splits the
    read-outs and end state it returns back into (B, H, ...)."""

    def loop(state, q, k, v, eta, alpha):
        batch, heads = q.shape[:2]
        outputs = function.apply(*(x.flatten(0, 1) for x in (q, k, v, eta, alpha, *state)))
        out, *state = (x.unflatten(0, (batch, heads)) for x in outputs)
        return out, tuple(state)

    return loop
