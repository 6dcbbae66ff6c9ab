"""The Titans memory's chunk loop as one C++ kernel on the CPU (``titans_cpu.cpp``), for
both memory kinds.

``chunk.py`` computes the gate coefficients with C-step scans over all chunks and runs every
chunk's hand-over and read-outs as tens of small ATen ops over all (batch, head) pairs; the C++
kernel runs each (batch, head) item's whole loop on one thread instead (why:
``ops/cpu_extension.py``), coefficients included, with the backward written out by hand
(recomputing each chunk from its saved chunk-start state). Same arguments, results and semantics
as ``chunk_titans_memory``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from nl_lightning.ops.cpu_extension import KERNEL_DTYPES, dense_grad, load_extension

from nl_lightning.ops.contract import MemoryState


class _TitansChunkLoop(torch.autograd.Function):
    """All chunks of a Titans memory for N = B·H items; layouts in ``titans_cpu.cpp``. The state
    is one ``[W; S]`` block per weight: two for the MLP memory, one for the linear memory."""

    @staticmethod
    def forward(ctx, kind, chunk_size, q, k, v, theta, eta, alpha, *blocks):
        inputs = [x.contiguous() for x in (q, k, v, theta, eta, alpha)]
        blocks = [b.contiguous() for b in blocks]
        forward = getattr(load_extension(), f"titans_{kind}_chunks_forward")
        y, *saved = forward(inputs, *blocks, chunk_size)
        ctx.save_for_backward(*inputs, *saved)
        ctx.kind, ctx.chunk_size = kind, chunk_size
        return (y, *(s[:, -1].clone() for s in saved))

    @staticmethod
    @once_differentiable
    def backward(ctx, d_y, *d_blocks):
        inputs, saved = list(ctx.saved_tensors[:6]), ctx.saved_tensors[6:]
        d_y = dense_grad(d_y, inputs[2])
        d_blocks = [dense_grad(d, s[:, -1]) for d, s in zip(d_blocks, saved)]
        backward = getattr(load_extension(), f"titans_{ctx.kind}_chunks_backward")
        grads = backward(inputs, *saved, d_y, *d_blocks, ctx.chunk_size)
        return (None, None, *grads)


def cpu_titans_memory(q, k, v, theta, eta, alpha, start: MemoryState, *, kind: str, chunk_size: int):
    """Same contract and results as ``chunk_titans_memory``; CPU tensors only."""
    if q.device.type != "cpu":
        raise ValueError(f"impl='cpu' runs on CPU tensors, got {q.device}; use impl='chunk' (or 'triton').")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"impl='cpu' computes in float32 or float64, got {q.dtype}; call it through titans_memory.")
    B, H, T, D = q.shape
    items = lambda x: x.flatten(0, 1)  # noqa: E731 - (B, H, ...) -> (B·H, ...)
    # One block per weight, [W; S] (titans_cpu.cpp): [W1; S1], [W2; S2] or [W; S].
    blocks = [items(torch.stack([w, s], dim=2)) for w, s in zip(start.weights, start.momentum)]
    y, *ends = _TitansChunkLoop.apply(
        kind, min(chunk_size, T), *(items(x) for x in (q, k, v, theta, eta, alpha)), *blocks
    )
    unflat = lambda x: x.unflatten(0, (B, H))  # noqa: E731
    weights, momentum = zip(*(unflat(end).unbind(2) for end in ends))
    return unflat(y), MemoryState(tuple(weights), tuple(momentum))
