"""HOPE's projection memories with each chunk's write as a Triton kernel (``triton_kernels.py``):
one launch for the four memories' state update forward, one backward, one program per (batch,
memory) pair.

The loop over chunks and the read-outs stay ``naive.py``'s (a read-out is two matmuls over the
four memories; the gates and key come from the read-outs of all four, so the chunks cannot run
in one persistent program). Runs on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``: slow, for testing).
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch.autograd.function import once_differentiable

from nl_lightning.ops.autocast import float32_under_autocast
from nl_lightning.ops.cpu_extension import dense_grad
from nl_lightning.ops.dgd.triton import MAX_WIDTH, launch_options
from nl_lightning.ops.projection.naive import projection_loop
from nl_lightning.ops.triton_launch import check_launchable, interpreting, on_device

# The memories' width D is streamed in blocks of this many columns (triton_kernels.py), so any
# d_model works; the chunk and the hidden size stay whole in one program and are bounded by the
# DGD kernels' MAX_WIDTH. At HOPE-tiny's sizes (C = 64, Dh = 48, float32) the DGD rule's backward
# stages 192 KB of shared memory with 64-wide blocks, over an A100's 163 KB, and 136 KB with
# 32-wide ones (the delta rule's: 160 and 120 KB; tests/ops/test_projection_triton.py).
BLOCK_D = 32


@functools.lru_cache(maxsize=None)
def _kernel_module():
    return importlib.import_module("nl_lightning.ops.projection.triton_kernels"), interpreting()


def kernels():
    """(forward, backward) kernels; they stay in the mode Triton was in at their first use."""
    module, interpreted = _kernel_module()
    if interpreted != interpreting():
        raise RuntimeError(
            f"the Triton projection kernels were jitted with TRITON_INTERPRET={int(interpreted)} but it is now "
            f"{int(interpreting())}; Triton fixes compiled or interpreted when it jits a function, so use one "
            "mode per process."
        )
    return module.projection_write_forward_kernel, module.projection_write_backward_kernel


def write_options(C: int, D: int, Dh: int, dtype: torch.dtype, delta: bool, block_d: int = BLOCK_D) -> dict:
    """The kernels' compile-time constants: the DGD kernels' (same helpers, same rule flags; the
    target is the memory's own under the delta rule, self-made under DGD), with D in blocks."""
    return launch_options(C, min(D, block_d), Dh, dtype, (delta, not delta))


class _ProjectionWrite(torch.autograd.Function):
    """One chunk's write of M memories of B items: key (B, C, D); target (B, M, C, D) under the
    delta rule, else the value (B, C, D) every memory's self-made target starts from; eta, alpha
    (B, C); w1 (B, M, D, Dh), w2 (B, M, Dh, D). Returns the end state."""

    @staticmethod
    def forward(ctx, key, target, eta, alpha, w1, w2, delta, block_d):
        # The first chunk's state is the slow weights expanded over the batch: copied here.
        key, target, eta, alpha, w1, w2 = (x.contiguous() for x in (key, target, eta, alpha, w1, w2))
        batch, memories, D, Dh = w1.shape
        C = key.shape[1]
        options = write_options(C, D, Dh, key.dtype, delta, block_d)
        block = options["BLOCK_C"]
        strides = (target.stride(0), target.stride(1)) if delta else (C * D, 0)
        new_w1, new_w2 = torch.empty_like(w1), torch.empty_like(w2)
        inverses = key.new_empty(batch, memories, 2, block, block)
        forward_kernel, _ = kernels()
        with on_device(key):
            forward_kernel[(batch * memories,)](
                key, target, eta, alpha, w1, w2, new_w1, new_w2, inverses, C, D, Dh, memories, *strides, **options
            )
        ctx.save_for_backward(key, target, eta, alpha, w1, w2, inverses)
        ctx.delta, ctx.block_d, ctx.strides = delta, block_d, strides
        return new_w1, new_w2

    @staticmethod
    @once_differentiable
    def backward(ctx, d_w1, d_w2):
        key, target, eta, alpha, w1, w2, inverses = ctx.saved_tensors
        batch, memories, D, Dh = w1.shape
        C = key.shape[1]
        options = write_options(C, D, Dh, key.dtype, ctx.delta, ctx.block_d)
        d_w1, d_w2 = dense_grad(d_w1, w1), dense_grad(d_w2, w2)
        scratch = key.new_empty(batch, memories, options["BLOCK_C"], options["BLOCK_C"])
        d_key = key.new_empty(batch, memories, C, D)  # per memory: summed below over the shared inputs
        d_target = key.new_empty(batch, memories, C, D)
        d_eta, d_alpha = key.new_empty(batch, memories, C), key.new_empty(batch, memories, C)
        grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
        _, backward_kernel = kernels()
        with on_device(key):
            backward_kernel[(batch * memories,)](
                key, target, eta, alpha, w1, w2, inverses, d_w1, d_w2, scratch,
                d_key, d_target, d_eta, d_alpha, grad_w1, grad_w2, C, D, Dh, memories, *ctx.strides, **options,
            )  # fmt: skip
        d_target = d_target if ctx.delta else d_target.sum(1)
        return d_key.sum(1), d_target, d_eta.sum(1), d_alpha.sum(1), grad_w1, grad_w2, None, None


def triton_write(block_d: int = BLOCK_D):
    """The loop's ``write`` (``naive.projection_loop``) as the Triton kernels."""

    @float32_under_autocast
    def write(state, key, value, target, eta, alpha, rule):
        delta = rule == "delta"
        return _ProjectionWrite.apply(key, target if delta else value, eta, alpha, *state, delta, block_d)

    return write


def triton_projection_memory(x, weights, gate_bias, *, chunk_size: int, eta_scale: float, rule: str,
                             block_d: int = BLOCK_D):  # fmt: skip
    """Same arguments, returns and semantics as ``naive_projection_memories``, on CUDA tensors (or
    CPU tensors under ``TRITON_INTERPRET=1``). ``block_d`` is the kernels' column block (tests use
    a small one to cover several blocks at a small width)."""
    check_launchable(x, "impl='triton'", "impl='cpu' or 'chunk'")
    widths = {"chunk_size": min(chunk_size, x.shape[1]), "hidden dim Dh": weights[0].shape[-1]}
    too_wide = {name: width for name, width in widths.items() if width > MAX_WIDTH}
    if too_wide:
        raise ValueError(
            f"impl='triton' keeps a chunk's C x Dh tiles on chip and supports the chunk and the projection "
            f"memories' hidden size up to {MAX_WIDTH}; got {too_wide}. Use impl='chunk', or a smaller "
            "proj_chunk_size."
        )
    return projection_loop(
        x, weights, gate_bias, chunk_size=chunk_size, eta_scale=eta_scale, rule=rule, write=triton_write(block_d)
    )
