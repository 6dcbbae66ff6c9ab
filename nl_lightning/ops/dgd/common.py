"""Definitions shared by every DGD implementation: the memory kinds."""

from __future__ import annotations

# Name -> number of weight matrices in a memory of that kind.
#   "linear": M(z) = W z,                 state (W,)       with W  (D, D)
#   "mlp":    M(z) = z + W1 silu(W2 z),   state (W1, W2)   with W1 (D, Dh), W2 (Dh, D)
KINDS = {"linear": 1, "mlp": 2}
