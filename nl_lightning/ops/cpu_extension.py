"""Build and load the ops' C++ kernels (``ops/<op>/<op>_cpu.cpp``; one extension for all of them).

The memory kernels' ATen chunk loops run tens of small ops per chunk, each over every (batch,
head) pair at once; on a CPU each op streams its operands through memory and synchronises the
thread pool, so the models spent most of their time between kernels (benchmarks/RESULTS.md,
"Kernel bound"). The C++ kernels give each thread whole items instead: an item's chunk
loop runs start to end with its few small matrices in cache, through BLAS calls and plain loops,
with the backward written out by hand. Their autograd wrappers are each op's ``cpu.py``.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler
and ninja are needed; under a minute on 2 cores, cached afterwards under ``TORCH_EXTENSIONS_DIR``).
float32 and float64 CPU tensors. ``impl="auto"`` (the models' default) uses the kernels where
``use_cpu_kernel`` allows and the ATen kernels elsewhere (``ops/contract.py``).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

OPS_DIR = Path(__file__).parent
SOURCE_DIR = OPS_DIR / "cpu"  # the bindings and the helpers every kernel includes (common.h)
# Each kernel lives next to the Python it mirrors (``ops/<op>/<op>_cpu.cpp`` beside ``cpu.py``); the
# file names differ because the build names each object file after its source's base name.
KERNEL_FILES = ("dgd/dgd_cpu.cpp", "projection/projection_cpu.cpp", "titans/titans_cpu.cpp", "conv/conv_cpu.cpp")
SOURCES = [SOURCE_DIR / "bindings.cpp", *(OPS_DIR / name for name in KERNEL_FILES)]
# -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers (without it the items run on one
# thread). -march=native: AVX2/FMA for the elementwise loops and substitutions, as inductor builds
# its CPU kernels; the build's name carries a hash of the CPU's feature flags (``_cpu_tag``), so a
# cache directory shared by different machines never hands one a binary built for another's
# instructions. -fno-trapping-math lets GCC turn the exp's clamps into selects so that the
# activation loops vectorise.
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-trapping-math"]
KERNEL_DTYPES = (torch.float32, torch.float64)  # what the kernels are built for (AT_DISPATCH_FLOATING_TYPES)
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
                name=f"nl_lightning_cpu_{_cpu_tag()}", sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"], verbose=False,
            )
        except Exception as error:  # compiler missing, headers missing, ...
            raise RuntimeError(
                f"could not build the C++ memory kernels ({', '.join(KERNEL_FILES)} under {OPS_DIR}): {error}. They need a C++ compiler "
                "and ninja; use memory_impl='chunk' (the ATen kernels, same results) where they are missing."
            ) from error
    return _extension


def use_cpu_kernel(x: torch.Tensor) -> bool:
    """What memory_impl="auto" decides: the fused kernels for CPU tensors, unless something must see
    the individual ATen ops (``torch.compile`` tracing, or a dispatch mode such as the FLOP counter
    or fake tensors), and only where the extension builds."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return cpu_kernels_available()


def cpu_kernels_available() -> bool:
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


def dense_grad(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An output's gradient as the kernels' backwards take it: contiguous, and zeros (shaped like
    the output) where autograd passes None because the output was not used."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()
