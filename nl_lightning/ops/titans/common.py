"""Shared pieces of the Titans memory operator: the state type, input checks and the memory maps.

Every implementation (naive, chunk, compiled, triton) uses the same conventions:

* memory maps Dk -> Dv, weights in column convention (``M(k) = W k``, ``W`` is ``(Dv, Dk)``);
* ``kind="linear"``: weights ``(W,)``; ``kind="mlp"``: weights ``(W1, W2)`` with
  ``M(z) = z + W1 silu(W2 z)``, ``W1: (Dv, Dh)``, ``W2: (Dh, Dk)`` and ``Dk == Dv``;
* the slow (trainable) initial weights are shared across the batch and carry a leading head
  dimension ``(H, ...)``; the fast state is per batch element, ``(B, H, ...)``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from nl_lightning.ops.activations import silu_grad

KINDS = ("linear", "mlp")

Weights = Union[Tensor, Sequence[Tensor]]


class MemoryState(NamedTuple):
    """Fast memory state of one call: per-batch weights and their momentum (the surprise ``S``).

    ``weights`` and ``momentum`` are tuples with one ``(B, H, ...)`` tensor per weight of the
    memory (``(W,)`` for linear, ``(W1, W2)`` for mlp), so a long sequence can be processed in
    pieces by handing the state returned by one call to the next.
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]


def as_weight_tuple(weights: Weights) -> tuple[Tensor, ...]:
    if isinstance(weights, Tensor):
        return (weights,)
    return tuple(weights)


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Weights,
    kind: str,
    chunk_size: int,
    state: MemoryState | None,
) -> tuple[Tensor, ...]:
    """Validate shapes and options; return the initial weights as a tuple.

    Errors say which value is wrong and what shape was expected, because a silent broadcast in
    a recurrence produces plausible-looking but wrong memories.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a Titans memory kind; use one of {KINDS}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(
            f"chunk_size={chunk_size!r} must be a positive int (1 = exact online gradient descent)."
        )
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, T, Dk); got shape {tuple(q.shape)}.")
    B, H, T, Dk = q.shape
    if T == 0:
        raise ValueError("q has T=0 tokens; the memory needs at least one token per call.")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}; got {tuple(k.shape)}.")
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be (B, H, T, Dv) = ({B}, {H}, {T}, Dv); got {tuple(v.shape)}.")
    Dv = v.shape[-1]
    for name, gate in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if gate.shape != (B, H, T):
            raise ValueError(
                f"{name} must be one value per (batch, head, token), shape ({B}, {H}, {T}); "
                f"got {tuple(gate.shape)}."
            )
    tensors = {"q": q, "k": k, "v": v, "theta": theta, "eta": eta, "alpha": alpha}
    for name, t in tensors.items():
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}; "
                "cast all inputs to one dtype and device."
            )

    ws = as_weight_tuple(weights)
    if kind == "linear":
        if len(ws) != 1:
            raise ValueError(f"kind='linear' takes one weight W (H, Dv, Dk); got {len(ws)} weights.")
        expected = [(H, Dv, Dk)]
    else:
        if Dk != Dv:
            raise ValueError(
                f"kind='mlp' is residual (M(z) = z + W1 silu(W2 z)) so it needs Dk == Dv; "
                f"got Dk={Dk}, Dv={Dv}. Use kind='linear' or project keys and values to one width."
            )
        if len(ws) != 2:
            raise ValueError(f"kind='mlp' takes weights (W1, W2); got {len(ws)} weights.")
        Dh = ws[0].shape[-1] if ws[0].dim() == 3 else -1
        expected = [(H, Dv, Dh), (H, Dh, Dk)]
    for i, (w, shape) in enumerate(zip(ws, expected)):
        if tuple(w.shape) != shape:
            raise ValueError(
                f"initial weight {i} of kind={kind!r} must have shape {shape} (heads first, "
                f"shared across the batch); got {tuple(w.shape)}."
            )
        if w.dtype != q.dtype or w.device != q.device:
            raise ValueError(
                f"initial weight {i} is {w.dtype} on {w.device} but q is {q.dtype} on {q.device}."
            )

    if state is not None:
        if len(state.weights) != len(ws) or len(state.momentum) != len(ws):
            raise ValueError(
                f"state has {len(state.weights)} weights and {len(state.momentum)} momenta; "
                f"kind={kind!r} needs {len(ws)} of each."
            )
        for i, (w, s, shape) in enumerate(zip(state.weights, state.momentum, expected)):
            full = (B, *shape)
            if tuple(w.shape) != full or tuple(s.shape) != full:
                raise ValueError(
                    f"state weight/momentum {i} must have shape {full} (one state per batch "
                    f"element); got {tuple(w.shape)} and {tuple(s.shape)}."
                )
    return ws


def initial_state(weights: tuple[Tensor, ...], batch: int, state: MemoryState | None) -> MemoryState:
    """The state the recurrence starts from: ``state`` if given, else the shared slow weights
    broadcast over the batch with zero momentum."""
    if state is not None:
        return MemoryState(tuple(state.weights), tuple(state.momentum))
    ws = tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in weights)
    return MemoryState(ws, tuple(torch.zeros_like(w) for w in ws))


def memory_forward(kind: str, weights: Sequence[Tensor], z: Tensor) -> Tensor:
    """Apply per-batch memories ``(B, H, ...)`` to inputs ``z: (B, H, N, Dk)`` -> ``(B, H, N, Dv)``."""
    if kind == "linear":
        (W,) = weights
        return z @ W.mT
    W1, W2 = weights
    return z + torch.nn.functional.silu(z @ W2.mT) @ W1.mT


def loss_grad_factors(kind: str, weights: Sequence[Tensor], k: Tensor, v: Tensor):
    """Per-token gradients of ``||M(k) - v||^2`` as rank-1 factors ``[(u, x), ...]``, one pair per
    weight, with ``grad_W = u x^T`` for every token (``k, v: (B, H, N, D)``).

    Returning factors instead of matrices is what lets the chunk kernel avoid materialising one
    weight-sized gradient per token.
    """
    if kind == "linear":
        (W,) = weights
        u = 2 * (k @ W.mT - v)
        return [(u, k)]
    W1, W2 = weights
    h = k @ W2.mT
    a = torch.nn.functional.silu(h)
    u1 = 2 * (k + a @ W1.mT - v)
    u2 = (u1 @ W1) * silu_grad(h)
    return [(u1, a), (u2, k)]
