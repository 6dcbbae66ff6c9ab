"""Fused CPU kernels for HOPE's DGD memories: each chunk loop as one C++ kernel.

``chunk.py`` runs each chunk as ~50 ATen ops over every (batch, head) pair at once; the kernels
in ``ops/cpu/`` run each item's whole loop on one thread (why: ``ops/cpu_extension.py``), with
the backward written out by hand (recomputing each chunk from its saved chunk-start state; the
projection loop also keeps its largest GEMM outputs).

* ``cpu/dgd_mlp_chunks.cpp``: the DGD MLP memory, one (batch, head) item per thread; same
  semantics as ``chunk_dgd_memory(kind="mlp")`` (``cpu_fused_dgd_memory``,
  ``dgd_memory(impl="cpu_fused")``).
* ``cpu/dgd_shared_key_loop.cpp``: HOPE's self-modifying projection loop (reads, gates, key
  normalisation and the four memories' shared-key update), one batch element per thread
  (``cpu_fused_projection_loop``; ``SelfModifyingMemory.project``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from nl_lightning.ops.cpu_extension import dense_grad, load_extension
from nl_lightning.ops.dgd.chunk import chunk_dgd_memory
from nl_lightning.ops.dgd.common import CURVATURE_EPS, NLMS_EPS, per_item_loop


class _MLPChunkLoop(torch.autograd.Function):
    """All chunks of a DGD MLP memory for N = B·H items; see ``ops/cpu/dgd_mlp_chunks.cpp`` for the
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


def cpu_fused_dgd_memory(q, k, v, eta, alpha, state, *, kind: str, chunk_size: int, rule="dgd", target="self"):
    """Same arguments, returns and semantics as ``chunk_dgd_memory``; ``kind="mlp"`` on CPU only."""
    if kind != "mlp":
        raise ValueError(f"impl='cpu_fused' implements kind='mlp' only, got kind={kind!r}; use impl='chunk'.")
    if q.device.type != "cpu":
        raise ValueError(f"impl='cpu_fused' runs on CPU tensors, got {q.device}; use impl='chunk' (or 'compiled').")
    loop = per_item_loop(_MLPChunkLoop, (rule == "delta", target == "self", NLMS_EPS, CURVATURE_EPS))
    return chunk_dgd_memory(q, k, v, eta, alpha, state, kind=kind, chunk_size=chunk_size, chunk_loop=loop)


class _ProjectionLoop(torch.autograd.Function):
    """HOPE's projection loop for B batch elements; see ``ops/cpu/dgd_shared_key_loop.cpp`` for the layouts."""

    @staticmethod
    def forward(ctx, x, w1, w2, gate_bias, chunk, eta_scale):
        x, w1, w2, gate_bias = (t.contiguous() for t in (x, w1, w2, gate_bias))
        out, w1s, w2s, saved = load_extension().shared_key_loop_forward(x, w1, w2, gate_bias, chunk, eta_scale)
        ctx.save_for_backward(x, gate_bias, out, w1s, w2s, saved)
        ctx.chunk, ctx.eta_scale = chunk, eta_scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        x, gate_bias, out, w1s, w2s, saved = ctx.saved_tensors
        dx, dw1, dw2, dbias = load_extension().shared_key_loop_backward(
            x, gate_bias, out, w1s, w2s, saved, d_out.contiguous(), ctx.chunk, ctx.eta_scale
        )
        return dx, dw1, dw2, dbias, None, None


def cpu_fused_projection_loop(x, w1, w2, gate_bias, *, chunk_size: int, eta_scale: float) -> torch.Tensor:
    """HOPE's self-modifying projection loop (``SelfModifyingMemory.project``) as one C++ kernel.

    Args:
        x: (B, T, D) the mixer's normalised input.
        w1, w2: (B, 4, D, Dh), (B, 4, Dh, D) the k, v, η, α memories' initial state per batch element.
        gate_bias: (2,) the projection memories' η and α gate biases.
        chunk_size: tokens per chunk; every chunk but the last updates the memories.
        eta_scale: η_t = eta_scale · σ(mean(read-out of M_η) + b_η).

    Returns:
        (B, 4, T, D) the four memories' read-outs M_{m, chunk start}(x_t).
    """
    if x.device.type != "cpu":
        raise ValueError(f"the fused projection loop runs on CPU tensors, got {x.device}; use memory_impl='chunk'.")
    return _ProjectionLoop.apply(x, w1, w2, gate_bias, chunk_size, eta_scale)
