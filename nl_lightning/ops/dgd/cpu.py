"""The DGD MLP memory's chunk loop as one C++ kernel on the CPU (``dgd_cpu.cpp``).

``chunk.py`` runs each chunk as ~50 ATen ops over every (batch, head) pair at once; the kernel runs
each item's whole loop on one thread (why: ``ops/cpu_extension.py``), with the backward written out
by hand (recomputing each chunk from its saved chunk-start state). Same semantics as
``chunk_dgd_memory(kind="mlp")``, both write rules and targets.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from nl_lightning.ops.cpu_extension import dense_grad, load_extension
from nl_lightning.ops.dgd.chunk import chunk_dgd_memory
from nl_lightning.ops.dgd.common import CURVATURE_EPS, NLMS_EPS, per_item_loop


class _MLPChunkLoop(torch.autograd.Function):
    """All chunks of a DGD MLP memory for N = B·H items; see ``dgd_cpu.cpp`` for the
    layouts. ``rule`` is the kernel's (delta, self_target, eps, curvature_eps)."""

    @staticmethod
    def forward(ctx, q, k, v, eta, alpha, w1, w2, rule):
        inputs = [x.contiguous() for x in (q, k, v, eta, alpha)]
        out, w1s, w2s = load_extension().mlp_chunks_forward(inputs, w1.contiguous(), w2.contiguous(), *rule)
        ctx.save_for_backward(*inputs, w1s, w2s)
        ctx.rule = rule
        return out, w1s[:, -1].clone(), w2s[:, -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_w1, d_w2):
        *inputs, w1s, w2s = ctx.saved_tensors
        d_out, d_w1, d_w2 = dense_grad(d_out, inputs[0]), dense_grad(d_w1, w1s[:, -1]), dense_grad(d_w2, w2s[:, -1])
        return (*load_extension().mlp_chunks_backward(inputs, w1s, w2s, d_out, d_w1, d_w2, *ctx.rule), None)


def cpu_dgd_memory(q, k, v, eta, alpha, start, *, kind: str, chunk_size: int, rule="dgd", target="self"):
    """Same arguments, returns and semantics as ``chunk_dgd_memory``; ``kind="mlp"`` on CPU only."""
    if kind != "mlp":
        raise ValueError(f"impl='cpu' implements kind='mlp' only, got kind={kind!r}; use impl='chunk'.")
    if q.device.type != "cpu":
        raise ValueError(f"impl='cpu' runs on CPU tensors, got {q.device}; use impl='chunk' (or 'compiled').")
    loop = per_item_loop(_MLPChunkLoop, (rule == "delta", target == "self", NLMS_EPS, CURVATURE_EPS))
    return chunk_dgd_memory(q, k, v, eta, alpha, start, kind=kind, chunk_size=chunk_size, chunk_loop=loop)
