"""HOPE's projection memories on the CPU: under the DGD rule the whole loop of ``naive.py`` as one
C++ kernel (``projection_cpu.cpp``), one batch element per thread, with the backward written out
by hand (recomputing each chunk from its saved start state and keeping the largest GEMM outputs)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from nl_lightning.ops.cpu_extension import load_extension
from nl_lightning.ops.projection.naive import projection_loop, write_through_dgd_op


class _ProjectionLoop(torch.autograd.Function):
    """HOPE's projection loop for B batch elements; see ``projection_cpu.cpp`` for the layouts."""

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


def cpu_projection_memories(x, weights, gate_bias, *, chunk_size: int, eta_scale: float, rule: str):
    """Same contract as ``naive_projection_memories``; CPU tensors. The DGD rule runs as one C++
    kernel (reads, gates, key normalisation and the shared-key update; it computes in float32 at
    least, with autocast off); the delta rule as the loop of ``naive.py`` with each chunk's write in
    the DGD op's C++ kernel."""
    if x.device.type != "cpu":
        raise ValueError(f"impl='cpu' runs on CPU tensors, got {x.device}; use impl='chunk'.")
    if rule == "delta":
        write = write_through_dgd_op("cpu")
        return projection_loop(x, weights, gate_bias, chunk_size=chunk_size, eta_scale=eta_scale, rule=rule, write=write)
    dtype = torch.promote_types(torch.promote_types(x.dtype, weights[0].dtype), torch.float32)
    w1, w2 = (w.to(dtype).expand(x.shape[0], *w.shape) for w in weights)
    with torch.autocast(x.device.type, enabled=False):
        out = _ProjectionLoop.apply(x.to(dtype), w1, w2, gate_bias.to(dtype), chunk_size, eta_scale)
    return out.to(x.dtype)
