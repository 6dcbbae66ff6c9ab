"""The DGD MLP memory's chunk loop as Triton kernels (``triton_kernels.py``): one launch for
the forward and one for the backward, one program per (batch, head) item.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``: slow,
for testing). Same semantics as ``chunk_dgd_memory(kind="mlp")``, which it plugs into as the
``chunk_loop`` (padding, chunking and the dtype handling stay there).
"""

from __future__ import annotations

import functools
import importlib

import torch
import triton
from torch.autograd.function import once_differentiable

from nl_lightning.ops.cpu_extension import dense_grad
from nl_lightning.ops.dgd.chunk import chunk_dgd_memory
from nl_lightning.ops.dgd.common import CURVATURE_EPS, NLMS_EPS, per_item_loop
from nl_lightning.ops.triton_launch import check_launchable, interpreting, on_device

# The widest chunk, head and hidden size the kernels take: at 64 the backward stages 144 KB in
# shared memory (an A100 has 163 KB per block, an H100 227 KB); at 128 it would need 448 KB.
MAX_WIDTH = 64


@functools.lru_cache(maxsize=None)
def _kernel_module():
    """The kernels' module and the mode it was jitted in, imported on first use."""
    return importlib.import_module("nl_lightning.ops.dgd.triton_kernels"), interpreting()


def kernels():
    """(forward, backward) kernels; they stay in the mode Triton was in at their first use."""
    module, interpreted = _kernel_module()
    if interpreted != interpreting():
        raise RuntimeError(
            f"the Triton DGD kernels were jitted with TRITON_INTERPRET={int(interpreted)} but it is now "
            f"{int(interpreting())}; Triton fixes compiled or interpreted when it jits a function, so use "
            "one mode per process."
        )
    return module.dgd_mlp_forward_kernel, module.dgd_mlp_backward_kernel


def launch_options(C: int, D: int, Dh: int, dtype: torch.dtype, rule: tuple[bool, bool]) -> dict:
    """The kernels' compile-time constants; ``rule`` is (delta, self_target): the write rule."""
    # Powers of two for tl.arange, and at least 16 for tl.dot. num_stages=1: the chunks depend on
    # each other, so software pipelining the chunk loop only multiplies shared memory.
    # num_warps: a program holds some thirty C x D tiles at once, far more than a few warps'
    # registers. At HOPE-tiny's 64-wide blocks (sm_90, float32) the backward spills 137 KB per
    # thread and compiles in 168 s (2-core VM) at 8 warps, 64 KB / 86 s at 16 and 19 KB / 27 s at
    # 32 (benchmarks/RESULTS.md, "HOPE DGD memory"). The grid is only B·H programs, so one program
    # per SM is no loss; smaller blocks get proportionally fewer warps.
    blocks = {
        "BLOCK_C": max(16, triton.next_power_of_2(C)),
        "BLOCK_D": max(16, triton.next_power_of_2(D)),
        "BLOCK_H": max(16, triton.next_power_of_2(Dh)),
    }
    tile = blocks["BLOCK_C"] * max(blocks["BLOCK_D"], blocks["BLOCK_H"])
    delta, self_target = rule
    return {
        "TINY": torch.finfo(dtype).tiny,
        **blocks,
        "DELTA": delta,
        "SELF_TARGET": self_target,
        "EPS": NLMS_EPS,
        "CURVATURE_EPS": CURVATURE_EPS,
        "num_stages": 1,
        "num_warps": max(4, min(32, tile // 128)),
    }


class _MLPChunkLoop(torch.autograd.Function):
    """All chunks of a DGD MLP memory for I = B·H items: q, k, v (I, N, C, D), eta, alpha
    (I, N, C), w1 (I, D, Dh), w2 (I, Dh, D); returns the read-outs and the end state. ``rule`` is
    (delta, self_target)."""

    @staticmethod
    def forward(ctx, q, k, v, eta, alpha, w1, w2, rule):
        inputs = [x.contiguous() for x in (q, k, v, eta, alpha)]
        items, n, C, D = q.shape
        Dh = w1.shape[-1]
        w1s = q.new_empty(items, n + 1, D, Dh)
        w2s = q.new_empty(items, n + 1, Dh, D)
        w1s[:, 0] = w1
        w2s[:, 0] = w2
        out = torch.empty_like(inputs[0])
        options = launch_options(C, D, Dh, q.dtype, rule)
        block = options["BLOCK_C"]
        inverses = q.new_empty(items, n, 2, block, block)  # the two UT-system inverses per chunk
        forward_kernel, _ = kernels()
        with on_device(q):
            forward_kernel[(items,)](*inputs, w1s, w2s, inverses, out, n, C, D, Dh, **options)
        ctx.save_for_backward(*inputs, w1s, w2s, inverses)
        ctx.rule = rule
        return out, w1s[:, -1].clone(), w2s[:, -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_w1, d_w2):
        *inputs, w1s, w2s, inverses = ctx.saved_tensors
        items, n, C, D = inputs[0].shape
        Dh = w1s.shape[-1]
        options = launch_options(C, D, Dh, d_out.dtype, ctx.rule)
        scratch = d_out.new_empty(items, options["BLOCK_C"], options["BLOCK_C"])
        d_out = dense_grad(d_out, inputs[0])
        d_w1 = dense_grad(d_w1, w1s[:, -1]).clone()  # the kernel overwrites them with d(initial state)
        d_w2 = dense_grad(d_w2, w2s[:, -1]).clone()
        grads = [torch.empty_like(x) for x in inputs]
        _, backward_kernel = kernels()
        with on_device(d_out):
            backward_kernel[(items,)](
                *inputs, w1s, w2s, inverses, d_out, d_w1, d_w2, scratch, *grads, n, C, D, Dh, **options
            )
        return (*grads, d_w1, d_w2, None)


def triton_dgd_memory(q, k, v, eta, alpha, start, *, kind: str, chunk_size: int, rule="dgd", target="self"):
    """Same arguments, returns and semantics as ``chunk_dgd_memory``; ``kind="mlp"``, both write
    rules and targets, on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``)."""
    if kind != "mlp":
        raise ValueError(f"impl='triton' implements kind='mlp' only, got kind={kind!r}; use impl='chunk'.")
    check_launchable(q, "impl='triton'", "impl='cpu' or 'chunk'")
    widths = {"chunk_size": min(chunk_size, q.shape[2]), "head dim D": q.shape[-1], "hidden dim Dh": start.weights[0].shape[-1]}
    too_wide = {name: width for name, width in widths.items() if width > MAX_WIDTH}
    if too_wide:
        raise ValueError(
            f"impl='triton' keeps a chunk's C x D tiles on chip and supports widths up to {MAX_WIDTH} "
            f"(HOPE's tiny and small presets); got {too_wide}. Use impl='chunk', or a smaller chunk_size."
        )
    loop = per_item_loop(_MLPChunkLoop, (rule == "delta", target == "self"))
    return chunk_dgd_memory(q, k, v, eta, alpha, start, kind=kind, chunk_size=chunk_size, chunk_loop=loop)
