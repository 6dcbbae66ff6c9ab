"""HOPE's self-modifying projection memories, the reference loop: four residual-MLP memories
(k, v, η, α) that all read the same inputs and write with one key, value and gate stream.

For each chunk of ``chunk_size`` tokens z (the last one included)::

    out_□ = M_□(z)                   read from the chunk-start state, □ ∈ {k, v, η, α}
    key = normalize(out_k), η = eta_scale · σ(mean(out_η) + b_η), α = σ(mean(out_α) + b_α)
    every memory writes (key, target, η, α) for every token of the chunk (not after the last chunk,
    whose update nothing would read)

with, per ``rule``: ``"dgd"`` the DGD rule and each memory's own target M_□,start(out_v) (the
paper's self-made target); ``"delta"`` the normalised delta rule and the target M_□,slow(out_v),
its slow (initial) map of the value (``models/hope.py`` says why). The write is the DGD op's,
with the four memories as its heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nl_lightning.ops.contract import MemoryState
from nl_lightning.ops.dgd import dgd_memory

MEMORIES = 4  # k, v, η, α


def read_memories(weights, z: torch.Tensor) -> torch.Tensor:
    """M(z) of the four memories for one chunk z (B, C, D) -> (B, 4, C, D).

    The memories read the same z, so their W2 are stacked and applied in one matmul (a broadcast
    z would be copied once per memory).
    """
    w1, w2 = weights
    hidden = F.silu(z @ w2.flatten(-3, -2).mT)  # (B, C, 4·Dh)
    hidden = hidden.unflatten(-1, (w2.shape[-3], -1)).transpose(1, 2)  # (B, 4, C, Dh)
    return z[:, None] + hidden @ w1.mT


def projection_gates(eta_read, alpha_read, gate_bias, eta_scale: float):
    """The writes' step gate and retention from the η and α memories' read-outs (B, C, D):
    ``η = eta_scale · σ(mean(eta_read) + b_η)``, ``α = σ(mean(alpha_read) + b_α)``, one per token."""
    eta = eta_scale * torch.sigmoid(eta_read.mean(-1) + gate_bias[0])
    return eta, torch.sigmoid(alpha_read.mean(-1) + gate_bias[1])


def projection_loop(x, weights, gate_bias, *, chunk_size: int, eta_scale: float, rule: str, write):
    """The loop over chunks; ``write(state, key, value, target, eta, alpha, rule)`` is one chunk's
    update of the four memories (each implementation brings its own) and returns their new weights."""
    batch = x.shape[0]
    slow = tuple(w.expand(batch, *w.shape) for w in weights)
    state = slow
    # split, not slicing chunk by chunk: the backward of one split concatenates the chunks'
    # gradients once, whereas each slice's backward writes into a zero tensor of the full size.
    chunks = x.split(chunk_size, dim=1)
    outputs = []
    for index, z in enumerate(chunks):
        out = read_memories(state, z)  # (B, 4, C, D), read from the chunk-start state
        outputs.append(out)
        if index == len(chunks) - 1:  # the last chunk's update would never be read
            break
        k, v, eta, alpha = out.unbind(1)
        eta, alpha = projection_gates(eta, alpha, gate_bias, eta_scale)
        if rule == "delta":
            target = read_memories(slow, v)  # (B, 4, C, D): each memory's slow map of the value
        else:
            target = v[:, None].expand(-1, MEMORIES, -1, -1)  # the DGD op makes M_□(v) from it
        state = write(state, F.normalize(k, dim=-1), v, target, eta, alpha, rule)
    return torch.cat(outputs, dim=2)


def write_through_dgd_op(impl: str):
    """One chunk's write as the DGD op's, the four memories as its heads, in implementation ``impl``."""

    def write(state, key, value, target, eta, alpha, rule):
        key = key[:, None].expand(-1, MEMORIES, -1, -1)
        eta, alpha = (t[:, None].expand(-1, MEMORIES, -1) for t in (eta, alpha))
        options = {"rule": "delta", "target": "value"} if rule == "delta" else {"rule": "dgd", "target": "self"}
        _, end = dgd_memory(
            key, key, target, eta, alpha, state=MemoryState(tuple(state)), kind="mlp", chunk_size=key.shape[2],
            impl=impl, **options,
        )
        return end.weights

    return write


def naive_projection_memories(x, weights, gate_bias, *, chunk_size: int, eta_scale: float, rule: str):
    """The reference: every chunk's write through the DGD op's token loop."""
    return projection_loop(
        x, weights, gate_bias, chunk_size=chunk_size, eta_scale=eta_scale, rule=rule, write=write_through_dgd_op("naive")
    )
