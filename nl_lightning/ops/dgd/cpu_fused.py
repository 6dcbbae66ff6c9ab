"""Fused CPU kernels for HOPE's DGD memories: each chunk loop as one C++ kernel.

``chunk.py`` runs each chunk as ~50 ATen ops over every (batch, head) pair at once; on a CPU each
op streams its operands through memory and synchronises the thread pool, so a HOPE block spent
most of its time between kernels (benchmarks/RESULTS.md, "Kernel bound"). The kernels in ``cpu/``
give each thread whole items instead: an item's chunk loop runs start to end with its few small
matrices in cache, through BLAS calls and plain loops, and the backward is written out by hand
(recomputing each chunk from its saved chunk-start state; the projection loop also keeps its
largest GEMM outputs).

* ``cpu/mlp_chunks.cpp``: the DGD MLP memory, one (batch, head) item per thread; same semantics
  as ``chunk_dgd_memory(kind="mlp")`` (``cpu_fused_dgd_memory``, ``dgd_memory(impl="cpu_fused")``).
* ``cpu/shared_key_loop.cpp``: HOPE's self-modifying projection loop (reads, gates, key
  normalisation and the four memories' shared-key update), one batch element per thread
  (``cpu_fused_projection_loop``; ``SelfModifyingMemory.project``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler
and ninja are needed; about a minute, cached afterwards under ``TORCH_EXTENSIONS_DIR``). float32
and float64 CPU tensors. ``memory_impl="auto"`` (the models' default) uses the kernels where
``use_fused_kernel`` allows and the ATen kernels elsewhere.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from nl_lightning.ops.dgd.chunk import chunk_dgd_memory

SOURCE_DIR = Path(__file__).with_name("cpu")
SOURCES = [SOURCE_DIR / name for name in ("bindings.cpp", "mlp_chunks.cpp", "shared_key_loop.cpp")]
# -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers (without it the items run on one
# thread). -march=native: AVX2/FMA for the elementwise loops and substitutions, as inductor builds
# its CPU kernels; the build's name carries a hash of the CPU's feature flags (``_cpu_tag``), so a
# cache directory shared by different machines never hands one a binary built for another's
# instructions. -fno-trapping-math lets GCC turn the exp's clamps into selects so that the
# activation loops vectorise.
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-trapping-math"]
_extension = None
_unavailable: str | None = None


def _cpu_tag() -> str:
    """Short hash of this CPU's model and feature flags (Linux /proc/cpuinfo; else the platform)."""
    import hashlib
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        signature = "\n".join(sorted({line for line in info if line.startswith(("flags", "model name"))}))
    except OSError:
        signature = ""
    signature = signature or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha1(signature.encode()).hexdigest()[:10]


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
                name=f"nl_lightning_dgd_cpu_{_cpu_tag()}", sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"], verbose=False,
            )
        except Exception as error:  # compiler missing, headers missing, ...
            raise RuntimeError(
                f"could not build the fused CPU DGD kernels ({SOURCE_DIR}): {error}. They need a C++ compiler "
                "and ninja; use memory_impl='chunk' (the ATen kernel, same results) where they are missing."
            ) from error
    return _extension


def use_fused_kernel(x: torch.Tensor) -> bool:
    """What memory_impl="auto" decides: the fused kernels for CPU tensors, unless something must see
    the individual ATen ops (``torch.compile`` tracing, or a dispatch mode such as the FLOP counter
    or fake tensors), and only where the extension builds."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return fused_kernel_available()


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
    def forward(ctx, q, k, v, eta, alpha, w1, w2):
        inputs = [x.contiguous() for x in (q, k, v, eta, alpha)]
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


def _fused_loop(state, q, k, v, eta, alpha):
    """``chunk_loop`` for ``chunk_dgd_memory``: (B, H, N, C, ...) inputs -> C++ kernel on B·H items."""
    w1, w2 = state
    batch, heads = q.shape[:2]
    items = lambda x: x.flatten(0, 1)  # noqa: E731 - (B, H, ...) -> (B·H, ...)
    out, w1, w2 = _MLPChunkLoop.apply(*(items(x) for x in (q, k, v, eta, alpha, w1, w2)))
    unflat = lambda x: x.unflatten(0, (batch, heads))  # noqa: E731
    return unflat(out), (unflat(w1), unflat(w2))


def cpu_fused_dgd_memory(q, k, v, eta, alpha, state, *, kind: str, chunk_size: int):
    """Same arguments, returns and semantics as ``chunk_dgd_memory``; ``kind="mlp"`` on CPU only."""
    if kind != "mlp":
        raise ValueError(f"impl='cpu_fused' implements kind='mlp' only, got kind={kind!r}; use impl='chunk'.")
    if q.device.type != "cpu":
        raise ValueError(f"impl='cpu_fused' runs on CPU tensors, got {q.device}; use impl='chunk' (or 'compiled').")
    return chunk_dgd_memory(q, k, v, eta, alpha, state, kind=kind, chunk_size=chunk_size, chunk_loop=_fused_loop)


class _ProjectionLoop(torch.autograd.Function):
    """HOPE's projection loop for B batch elements; see ``shared_key_loop.cpp`` for the layouts."""

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
