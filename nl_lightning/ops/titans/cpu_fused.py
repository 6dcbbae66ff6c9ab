"""The Titans MLP memory's chunk loop as one C++ kernel on the CPU (``ops/cpu/titans_chunks.cpp``).

``chunk.py`` computes the gate coefficients with C-step scans over all chunks and runs every
chunk's hand-over and read-outs as tens of small ATen ops over all (batch, head) pairs; the C++
kernel runs each (batch, head) item's whole loop on one thread instead (why:
``ops/cpu_extension.py``), coefficients included, with the backward written out by hand
(recomputing each chunk from its saved chunk-start state). Same arguments, results and semantics as ``chunk_titans_memory``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nl_lightning.ops.cpu_extension import load_extension

from .common import MemoryState, Weights, check_inputs, initial_state

# dtypes the kernel computes in; others (bfloat16, float16) are computed in float32.
_KERNEL_DTYPES = (torch.float32, torch.float64)


class _TitansMLPChunkLoop(torch.autograd.Function):
    """All chunks of a Titans MLP memory for N = B·H items; layouts in ``titans_chunks.cpp``."""

    @staticmethod
    def forward(ctx, q, k, v, theta, eta, alpha, state1, state2, chunk_size):
        inputs = [x.contiguous() for x in (q, k, v, theta, eta, alpha)]
        y, state1s, state2s = load_extension().titans_mlp_chunks_forward(
            inputs, state1.contiguous(), state2.contiguous(), chunk_size
        )
        ctx.save_for_backward(*inputs, state1s, state2s)
        ctx.chunk_size = chunk_size
        return y, state1s[:, -1].clone(), state2s[:, -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_y, d_state1, d_state2):
        *inputs, state1s, state2s = ctx.saved_tensors
        d_y = torch.zeros_like(inputs[0]) if d_y is None else d_y.contiguous()
        d_state1 = torch.zeros_like(state1s[:, -1]) if d_state1 is None else d_state1.contiguous()
        d_state2 = torch.zeros_like(state2s[:, -1]) if d_state2 is None else d_state2.contiguous()
        grads = load_extension().titans_mlp_chunks_backward(
            inputs, state1s, state2s, d_y, d_state1, d_state2, ctx.chunk_size
        )
        return (*grads, None)


def cpu_fused_titans_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Weights,
    *,
    kind: str = "mlp",
    chunk_size: int = 64,
    state: MemoryState | None = None,
) -> tuple[Tensor, MemoryState]:
    """Same arguments and results as ``chunk_titans_memory``; ``kind="mlp"`` on CPU tensors only."""
    if kind != "mlp":
        raise ValueError(f"impl='cpu_fused' implements kind='mlp' only, got kind={kind!r}; use impl='chunk'.")
    if q.device.type != "cpu":
        raise ValueError(f"impl='cpu_fused' runs on CPU tensors, got {q.device}; use impl='chunk' (or 'triton').")
    ws = check_inputs(q, k, v, theta, eta, alpha, weights, kind, chunk_size, state)
    B, H, T, D = q.shape
    start = initial_state(ws, B, state)
    dtype = q.dtype if q.dtype in _KERNEL_DTYPES else torch.float32
    items = lambda x: x.flatten(0, 1).to(dtype)  # noqa: E731 - (B, H, ...) -> (B·H, ...)
    # A state is one block per layer, [W1; S1] and [W2; S2] (titans_chunks.cpp).
    state1, state2 = (
        items(torch.stack([w, s], dim=2)) for w, s in zip(start.weights, start.momentum)
    )
    y, end1, end2 = _TitansMLPChunkLoop.apply(
        *(items(x) for x in (q, k, v, theta, eta, alpha)), state1, state2, min(chunk_size, T)
    )
    unflat = lambda x: x.unflatten(0, (B, H)).to(q.dtype)  # noqa: E731
    (W1, S1), (W2, S2) = unflat(end1).unbind(2), unflat(end2).unbind(2)
    return unflat(y), MemoryState((W1, W2), (S1, S2))
