"""Definitions shared by the DGD implementations: memory kinds, write rules, the fused kernels' item layout."""

from __future__ import annotations

# Name -> number of weight matrices in a memory of that kind.
#   "linear": M(z) = W z,                 state (W,)       with W  (D, D)
#   "mlp":    M(z) = z + W1 silu(W2 z),   state (W1, W2)   with W1 (D, Dh), W2 (Dh, D)
KINDS = {"linear": 1, "mlp": 2}

# How a token writes (``naive.py`` has the equations):
#   "dgd":   the paper's DGD rule, W (αI − η x xᵀ) − η ∇_W ||M(k) − v̂||², gradients at the chunk start;
#   "delta": the layer-local normalised delta rule, W (αI − η_l x xᵀ) + η_l (y − g) xᵀ with
#            η_l = β / (||x||² + ε): stable at β = 1, where one token stores an association.
RULES = ("dgd", "delta")
# What the memory is trained to return for a key: "self" (v̂ = M(v), the paper's self-made
# target) or "value" (v itself, as in Titans and the delta rule).
TARGETS = ("self", "value")

# ε of the delta rule's step β / (||x||² + ε): keeps a near-zero layer input from making the step
# unbounded (the write η ||u|| ||x|| is at most β ||u|| / (2 √ε)); small next to the unit keys'
# ||k||² = 1 and the hidden layer's ||silu(W2 k)||² (order Dh / 4).
NLMS_EPS = 1e-3
# ε of W2's curvature normalisation, (1 − β'_1) Jᵀe / (||J||_F² + ε) (naive.py). With ε = 1 the step is
# the plain gradient where ||J|| << 1 (hidden features in silu's flat region, or a small W1) and
# NLMS where ||J|| >> 1, never overshoots to first order (||J||²/(||J||² + 1) < 1), and moves the
# pre-activations by at most ||e||/2 per token; a tiny ε would allow ||e||/(2√ε). (On 1,024 random
# associations with half the keys in silu's flat region, ε = 1e-3 and 1 gave states within 15%.)
CURVATURE_EPS = 1.0


def check_rule(rule: str, target: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not a DGD write rule; use one of {list(RULES)}.")
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not a memory target; use one of {list(TARGETS)}.")


def per_item_loop(function, *extra):
    """A ``chunk_loop`` for ``chunk_dgd_memory`` that hands the chunked (B, H, N, C, ...) inputs
    and state to ``function.apply`` as B·H items (the fused kernels' layout), followed by the
    non-tensor options ``extra``, and splits the read-outs and end state it returns back into
    (B, H, ...)."""

    def loop(state, q, k, v, eta, alpha):
        batch, heads = q.shape[:2]
        outputs = function.apply(*(x.flatten(0, 1) for x in (q, k, v, eta, alpha, *state)), *extra)
        out, *state = (x.unflatten(0, (batch, heads)) for x in outputs)
        return out, tuple(state)

    return loop
