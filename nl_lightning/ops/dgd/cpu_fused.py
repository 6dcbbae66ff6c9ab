"""Fused CPU DGD memory: the chunk loop of ``chunk.py``'s MLP memory as one C++ kernel.

``chunk.py`` runs each chunk as ~50 ATen ops over every (batch, head) pair at once; on a CPU each
op streams its operands through memory and synchronises the thread pool, so a HOPE block spends
most of its time between kernels (benchmarks/RESULTS.md, "Kernel bound"). ``cpu/mlp_chunks.cpp``
gives each thread whole (batch, head) items instead: the item's chunk loop runs start to end with
its few small matrices in cache, through BLAS calls and plain loops, and its backward is written
out by hand (recomputing each chunk from its saved chunk-start state). The chunk-local terms that
need no state (decays, the key system, the key read matrix) are still built for all chunks at once
by ``chunk.py``'s batched code, and autograd differentiates them.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler
and ninja are needed; about half a minute, cached afterwards under ``TORCH_EXTENSIONS_DIR``).
Same semantics as ``chunk_dgd_memory`` with ``kind="mlp"``; float32 and float64, CPU tensors.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from nl_lightning.ops.dgd.chunk import chunk_dgd_memory

SOURCE = Path(__file__).with_name("cpu") / "mlp_chunks.cpp"
# -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers (without it the items run on one
# thread). -march=native: AVX2/FMA for the elementwise loops and substitutions, as inductor builds
# its CPU kernels (the build is cached per machine). -fno-trapping-math lets GCC turn the exp's
# clamps into selects so that the activation loops vectorise.
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-trapping-math"]
_extension = None
_unavailable: str | None = None


def load_extension():
    """Compile (first call on a machine) and import the C++ kernel."""
    global _extension
    if _extension is None:
        from torch.utils.cpp_extension import load

        # pip installs ninja next to the interpreter; a venv's python run by path has it off PATH.
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join(filter(None, [os.environ.get("PATH"), bin_dir]))
        try:
            _extension = load(
                name="nl_lightning_dgd_mlp_chunks", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"], verbose=False,
            )
        except Exception as error:  # compiler missing, headers missing, ...
            raise RuntimeError(
                f"could not build the fused CPU DGD kernel ({SOURCE.name}): {error}. It needs a C++ compiler "
                "and ninja; use memory_impl='chunk' (the ATen kernel, same results) where they are missing."
            ) from error
    return _extension


def fused_kernel_available() -> bool:
    """Whether the kernel builds here; the first failure is reported once as a warning."""
    global _unavailable
    if _extension is not None:
        return True
    if _unavailable is None:
        try:
            load_extension()
            return True
        except RuntimeError as error:
            _unavailable = str(error)
            warnings.warn(f"{error} memory_impl='auto' falls back to 'chunk'.", RuntimeWarning, stacklevel=3)
    return False


class _MLPChunkLoop(torch.autograd.Function):
    """All chunks of a DGD MLP memory for N = B·H items; see ``mlp_chunks.cpp`` for the layouts."""

    @staticmethod
    def forward(ctx, q, k, v, eta, lg, lgp, prev_ratio, ratio, k_system, k_read, w1, w2):
        inputs = [x.contiguous() for x in (q, k, v, eta, lg, lgp, prev_ratio, ratio, k_system, k_read)]
        out, w1s, w2s = load_extension().mlp_chunks_forward(inputs, w1.contiguous(), w2.contiguous())
        ctx.save_for_backward(*inputs, w1s, w2s)
        return out, w1s[:, -1].clone(), w2s[:, -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_w1, d_w2):
        *inputs, w1s, w2s = ctx.saved_tensors
        d_out = torch.zeros_like(inputs[0]) if d_out is None else d_out.contiguous()
        d_w1 = torch.zeros_like(w1s[:, -1]) if d_w1 is None else d_w1.contiguous()
        d_w2 = torch.zeros_like(w2s[:, -1]) if d_w2 is None else d_w2.contiguous()
        return tuple(load_extension().mlp_chunks_backward(inputs, w1s, w2s, d_out, d_w1, d_w2))


def _fused_loop(state, q, k, v, eta, terms):
    """``chunk_loop`` for ``chunk_dgd_memory``: (B, H, N, C, ...) inputs -> C++ kernel on B·H items."""
    w1, w2 = state
    batch, heads = q.shape[:2]
    items = lambda x: x.flatten(0, 1)  # noqa: E731 - (B, H, ...) -> (B·H, ...)
    out, w1, w2 = _MLPChunkLoop.apply(
        *(items(x) for x in (q, k, v, eta, *terms.decays, terms.k_system, terms.k_read)), items(w1), items(w2)
    )
    unflat = lambda x: x.unflatten(0, (batch, heads))  # noqa: E731
    return unflat(out), (unflat(w1), unflat(w2))


def cpu_fused_dgd_memory(q, k, v, eta, alpha, state, *, kind: str, chunk_size: int):
    """Same arguments, returns and semantics as ``chunk_dgd_memory``; ``kind="mlp"`` on CPU only."""
    if kind != "mlp":
        raise ValueError(f"impl='cpu_fused' implements kind='mlp' only, got kind={kind!r}; use impl='chunk'.")
    if q.device.type != "cpu":
        raise ValueError(f"impl='cpu_fused' runs on CPU tensors, got {q.device}; use impl='chunk' (or 'compiled').")
    return chunk_dgd_memory(q, k, v, eta, alpha, state, kind=kind, chunk_size=chunk_size, chunk_loop=_fused_loop)
