"""HOPE's self-modifying projection memories (k, v, η, α) as an op (``ops/contract.py``):
``naive.py`` (the loop, each chunk's write through the DGD op's token loop), ``chunk.py``,
``cpu.py`` + ``projection_cpu.cpp``, ``triton.py`` + ``triton_kernels.py`` (each chunk's write)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nl_lightning.ops.contract import check_chunk_size, check_impl, implementation, resolve_impl
from nl_lightning.ops.dgd.common import RULES
from nl_lightning.ops.projection.chunk import chunk_projection_memories
from nl_lightning.ops.projection.cpu import cpu_projection_memories
from nl_lightning.ops.projection.naive import MEMORIES, naive_projection_memories, projection_gates

IMPLEMENTED = ("naive", "chunk", "cpu", "triton")
# "triton" is imported on first use (contract.implementation): it needs the optional triton package.
_FUNCTIONS = {"naive": naive_projection_memories, "chunk": chunk_projection_memories, "cpu": cpu_projection_memories}
# No compiled loop of its own: under "compiled" the loop runs its chunk path, whose per-chunk
# writes are single kernel calls (the models pass one memory_impl to all their ops).
CHUNK_PATH = ("compiled",)

__all__ = ["IMPLEMENTED", "MEMORIES", "projection_gates", "projection_memories"]


def projection_memories(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    gate_bias: torch.Tensor,
    *,
    chunk_size: int,
    eta_scale: float,
    rule: str,
    impl: str = "auto",
) -> torch.Tensor:
    """Read and write HOPE's four projection memories over a sequence (``naive.py`` has the loop).

    Args:
        x: (B, T, D) the inputs every memory reads (HOPE: the mixer's normalised input).
        weights: (W1, W2) with W1 (4, D, Dh), W2 (4, Dh, D): the memories' initial (slow, trained)
            state, in the order k, v, η, α.
        gate_bias: (2,) the biases of the writes' step gate η and retention α.
        chunk_size: tokens read from one state; each chunk but the last then writes.
        eta_scale: η = eta_scale · σ(mean(read-out of M_η) + b_η) (``projection_gates``).
        rule: ``"dgd"`` (the paper's DGD rule with the self-made target M_□(v)) or ``"delta"`` (the
            normalised delta rule with target M_□,slow(v)).
        impl: ``"naive"``, ``"chunk"``, ``"cpu"``, ``"triton"`` (each chunk's write one kernel launch;
            CUDA, or the interpreter; chunks and hidden size up to 64) or ``"auto"``; ``"compiled"``
            runs the chunk path.

    Returns:
        (B, 4, T, D): the read-outs M_□,chunk start(x_t) of the four memories.
    """
    impl = "chunk" if impl in CHUNK_PATH else impl
    check_impl(impl, IMPLEMENTED, "projection_memories")
    check_chunk_size(chunk_size)
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not a write rule of the projection memories; use one of {list(RULES)}.")
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, D); got shape {tuple(x.shape)}.")
    weights = tuple(weights)
    dim = x.shape[-1]
    hidden = weights[0].shape[-1] if len(weights) == 2 and weights[0].dim() == 3 else -1
    expected = [(MEMORIES, dim, hidden), (MEMORIES, hidden, dim)]
    if len(weights) != 2 or [tuple(w.shape) for w in weights] != expected:
        raise ValueError(
            f"weights must be (W1, W2) of shapes {expected} (4 memories, D={dim}); got {[tuple(w.shape) for w in weights]}."
        )
    if gate_bias.shape != (2,):
        raise ValueError(f"gate_bias must be (2,): the biases of η and α; got {tuple(gate_bias.shape)}.")
    impl = resolve_impl(impl, x)
    function = implementation("projection", impl, _FUNCTIONS)
    return function(x, weights, gate_bias, chunk_size=chunk_size, eta_scale=eta_scale, rule=rule)
