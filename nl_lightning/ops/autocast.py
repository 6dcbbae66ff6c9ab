"""Mixed precision for the memory kernels: under autocast they are float32 operators.

A memory's state is a running sum over the whole sequence, and the DGD kernels solve triangular
systems that have no half-precision kernel, so the kernels compute in float32 at least (as
flash-linear-attention keeps its states). Under ``torch.autocast`` their inputs arrive in mixed
dtypes (a projection's output in bfloat16, a normalised key or a gate in float32, the initial
weights in float32), and autocast would otherwise run the kernels' own matmuls in bfloat16.
``float32_under_autocast`` treats a kernel like the ops autocast lists as float32 ops (softmax,
norms): half-precision inputs are upcast, the kernel runs with autocast off, and its outputs
stay float32, as ``torch.amp.custom_fwd(cast_inputs=torch.float32)`` does for an autograd
Function. Outside autocast nothing changes: mismatched dtypes are still refused by the kernels'
input checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)
Kernel = TypeVar("Kernel", bound=Callable[..., Any])


def upcast_half(value: Any) -> Any:
    """float16/bfloat16 tensors inside ``value`` (a tensor, or tuples, NamedTuples and lists of
    them, nested) as float32; every other value unchanged."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in HALF else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple, e.g. MemoryState
        return type(value)(*(upcast_half(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(upcast_half(v) for v in value)
    return value


def float32_under_autocast(kernel: Kernel) -> Kernel:
    """Run ``kernel`` as a float32 operator when autocast is on for its inputs' device."""

    @functools.wraps(kernel)
    def wrapper(*args, **kwargs):
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
        device_type = first.device.type if first is not None else None
        if device_type is None or not _autocast_enabled(device_type):
            return kernel(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return kernel(*upcast_half(args), **{name: upcast_half(v) for name, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def _autocast_enabled(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
