"""What the Triton memory kernels (``ops/titans/triton.py``, ``ops/dgd/triton.py``)
share about where they run: on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``: slow, for testing). Imported only by those modules, so the package works
without Triton."""

from __future__ import annotations

import contextlib

import torch
import triton
from torch import Tensor


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def on_device(t: Tensor):
    """Context for a launch on ``t``'s device: Triton launches on the current CUDA device, which
    need not be the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_launchable(x: Tensor, kernel: str, fallback: str) -> None:
    """Raise, naming the fixes, when ``x`` is a CPU tensor and Triton cannot interpret."""
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"{kernel} got CPU tensors but Triton is not in interpreter mode; move the inputs to a CUDA "
            "device, or set TRITON_INTERPRET=1 to run Triton's interpreter (CPU, slow, for testing), or use "
            f"{fallback}."
        )
