"""The contract every memory op follows, in one place.

An op is a folder ``ops/<op>/`` (as flash-linear-attention lays out ``ops/<op>/{naive,chunk,...}``):

* ``__init__.py``: the entry point, e.g. ``titans_memory(..., impl=...)``. It is the only thing
  models import. It validates the inputs with the checks below, picks the implementation with
  :func:`resolve_impl`, upcasts half precision with :func:`full_precision` and hands the
  implementation inputs it can trust;
* one module per implementation, side by side, each a function with the same signature
  ``fn(q, k, v, *gates, start, *, kind, chunk_size, **options) -> (out, end_state)``:

  ========== ===================================================================================
  impl       what it is
  ========== ===================================================================================
  naive      ``naive.py``: the token-by-token definition, the reference every other is tested on
  chunk      ``chunk.py``: chunk-parallel PyTorch (ATen), any device
  compiled   ``compiled.py``: the chunk step through ``torch.compile``
  cpu        ``cpu.py`` + ``<op>_cpu.cpp``: the chunk loop as one C++ kernel on CPU tensors
  triton     ``triton.py``: Triton kernels, on CUDA or under ``TRITON_INTERPRET=1``
  auto       ``cpu`` where :func:`use_cpu_kernel` allows it and the op has it, else ``chunk``
  ========== ===================================================================================

An implementation an op lacks (or a case it does not cover, such as a memory kind) is refused
with an error naming the implementations that do it; none silently falls back.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from nl_lightning.ops.cpu_extension import use_cpu_kernel

IMPLS = ("naive", "chunk", "compiled", "cpu", "triton", "auto")
# Old names still found in configs, with what they are called now (refused with the new name).
RENAMED_IMPLS = {"cpu_fused": "cpu", "fused": "compiled"}

# Memory kind -> number of weight matrices:
#   "linear": M(z) = W z,                 weights (W,)       with W  (Dv, Dk)
#   "mlp":    M(z) = z + W1 silu(W2 z),   weights (W1, W2)   with W1 (D, Dh), W2 (Dh, D)
KINDS = {"linear": 1, "mlp": 2}

Weights = Union[Tensor, Sequence[Tensor]]


class MemoryState(NamedTuple):
    """A memory's fast state after a call: per-batch weights ``(B, H, ...)``, one tensor per weight
    of the kind, and their momentum where the write rule has one (Titans' paper rule; empty
    otherwise). Hand it to the next call as ``state=`` to continue a sequence: splitting a sequence
    on a chunk boundary gives the result of one call."""

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...] = ()


def check_impl(impl: str, implemented: Sequence[str], op: str) -> None:
    """Refuse an ``impl`` that is not a name of the contract, or that ``op`` does not implement."""
    if impl in RENAMED_IMPLS:
        raise ValueError(f"impl={impl!r} is now called impl={RENAMED_IMPLS[impl]!r}; rename it in your config.")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not a memory-op implementation; use one of {list(IMPLS)}.")
    if impl != "auto" and impl not in implemented:
        raise ValueError(f"{op} has no impl={impl!r}; it implements {[*implemented, 'auto']}.")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a memory kind; use one of {list(KINDS)}.")


def check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (1 = the exact online rule).")


def check_sequence(q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor]) -> tuple[int, int, int, int, int]:
    """Shapes, dtypes and devices of one call's sequence: ``q, k (B, H, T, Dk)``, ``v (B, H, T, Dv)``
    and one ``(B, H, T)`` value per gate. Returns ``(B, H, T, Dk, Dv)``.

    Errors say which value is wrong and what was expected: a silent broadcast in a recurrence gives
    plausible-looking but wrong memories.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, T, Dk); got shape {tuple(q.shape)}.")
    batch, heads, length, dk = q.shape
    if length == 0:
        raise ValueError("q has T=0 tokens; the memory needs at least one token per call.")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}; got {tuple(k.shape)}.")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, H, T, Dv) = ({batch}, {heads}, {length}, Dv); got {tuple(v.shape)}.")
    for name, gate in gates.items():
        if gate.shape != q.shape[:3]:
            raise ValueError(
                f"{name} must be one value per (batch, head, token), shape {tuple(q.shape[:3])}; got {tuple(gate.shape)}."
            )
    for name, x in {"k": k, "v": v, **gates}.items():
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{name} is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}; cast all inputs to one."
            )
    return batch, heads, length, dk, v.shape[-1]


def weight_shapes(kind: str, dk: int, dv: int, hidden: int) -> list[tuple[int, ...]]:
    """The weights' shapes of a memory of ``kind`` (without leading dims)."""
    if kind == "linear":
        return [(dv, dk)]
    return [(dv, hidden), (hidden, dk)]


def check_weights(tensors: Weights, kind: str, lead: tuple[int, ...], dk: int, dv: int, name: str, like: Tensor):
    """``tensors`` as a tuple, checked to be the weights of a ``kind`` memory with leading dims
    ``lead`` (``(H,)`` for the shared initial weights, ``(B, H)`` for a per-batch state)."""
    tensors = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
    layout = "(W,)" if kind == "linear" else "(W1, W2)"
    if kind == "mlp" and dk != dv:
        raise ValueError(
            f"kind='mlp' is residual (M(z) = z + W1 silu(W2 z)) so it needs Dk == Dv; got Dk={dk}, Dv={dv}. "
            "Use kind='linear' or project keys and values to one width."
        )
    if len(tensors) != KINDS[kind]:
        raise ValueError(f"{name} for kind={kind!r} must be {layout}; got {len(tensors)} tensors.")
    hidden = tensors[0].shape[-1] if tensors[0].dim() > 0 else 0  # Dh is read from W1
    for i, (x, shape) in enumerate(zip(tensors, weight_shapes(kind, dk, dv, hidden))):
        full = (*lead, *shape)
        if tuple(x.shape) != full:
            raise ValueError(
                f"{name}[{i}] of {layout} for kind={kind!r} must have shape {full} "
                f"(leading dims {'(H,)' if len(lead) == 1 else '(B, H)'}); got {tuple(x.shape)}."
            )
        if x.dtype != like.dtype or x.device != like.device:
            raise ValueError(
                f"{name}[{i}] is {x.dtype} on {x.device} but q is {like.dtype} on {like.device}; cast it to match."
            )
    return tensors


def start_state(
    weights: Weights | None, state: MemoryState | None, kind: str, q: Tensor, v: Tensor, *, momentum: bool
) -> MemoryState:
    """The state a call starts from, checked: ``state`` if given, else the shared initial weights
    broadcast over the batch (with zero momentum where the rule has one). Exactly one of the two."""
    if (weights is None) == (state is None):
        raise ValueError(
            "Give exactly one of `weights` (initial per-head weights) and `state` (the per-batch state "
            f"a previous call returned); got weights={'set' if weights is not None else None}, "
            f"state={'set' if state is not None else None}."
        )
    batch, heads, dk, dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    if state is None:
        ws = check_weights(weights, kind, (heads,), dk, dv, "weights", q)
        ws = tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in ws)
        return MemoryState(ws, tuple(torch.zeros_like(w) for w in ws) if momentum else ())
    if not isinstance(state, MemoryState):
        raise ValueError(
            f"state must be the MemoryState a previous call returned; got {type(state).__name__}. "
            "Wrap per-batch weights as MemoryState(weights=(...,))."
        )
    ws = check_weights(state.weights, kind, (batch, heads), dk, dv, "state.weights", q)
    if momentum:
        ms = check_weights(state.momentum, kind, (batch, heads), dk, dv, "state.momentum", q)
    elif state.momentum:
        raise ValueError("this write rule keeps no momentum; state.momentum must be empty.")
    else:
        ms = ()
    return MemoryState(ws, ms)


def resolve_impl(impl: str, x: Tensor, cpu_applies: bool = True) -> str:
    """``auto`` → ``cpu`` where the op's C++ kernel covers the case (``cpu_applies``) and
    :func:`use_cpu_kernel` allows it (CPU tensors, not traced, no dispatch mode, the extension
    builds), else ``chunk``; any other name is returned as it is."""
    if impl != "auto":
        return impl
    return "cpu" if cpu_applies and use_cpu_kernel(x) else "chunk"


def implementation(op: str, impl: str, functions: dict):
    """The function of a resolved ``impl``: from ``functions`` (the op's implementations, imported
    with it: an import inside a traced call would break ``torch.compile``'s graph), or, for
    ``triton``, ``ops/<op>/triton.py``'s ``triton_<...>`` imported on first use, because it needs
    the optional triton package and nothing else should pay for it."""
    if impl != "triton":
        return functions[impl]
    try:
        module = importlib.import_module(f"nl_lightning.ops.{op}.triton")
    except ImportError as err:
        raise ImportError(
            f"impl='triton' needs the triton package ({err}); install it (the dev extra pins a version "
            "matching torch) or use impl='chunk'."
        ) from err
    return getattr(module, f"triton_{op}_memory")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a memory computes in: float32 at least. The state is a running sum over the sequence
    (flash-linear-attention keeps its states in float32 too) and the triangular solves have no
    half-precision kernel."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def full_precision(function, q: Tensor, k: Tensor, v: Tensor, gates: Sequence[Tensor], start: MemoryState, **options):
    """Run ``function`` with half-precision inputs upcast to :func:`compute_dtype`; the read-outs
    and the end state come back in the input dtype."""
    dtype = q.dtype
    up = lambda t: t.to(compute_dtype(dtype))  # noqa: E731
    start = MemoryState(tuple(map(up, start.weights)), tuple(map(up, start.momentum)))
    out, end = function(up(q), up(k), up(v), *map(up, gates), start, **options)
    down = lambda t: t.to(dtype)  # noqa: E731
    return down(out), MemoryState(tuple(map(down, end.weights)), tuple(map(down, end.momentum)))


def memory_read(kind: str, weights: Sequence[Tensor], z: Tensor) -> Tensor:
    """``M(z)``: per-batch (or broadcastable) weights ``(..., Dv, Dk)`` applied to ``z (..., N, Dk)``:
    ``W z`` for the linear memory, the residual MLP ``z + W1 silu(W2 z)`` for the MLP memory."""
    if kind == "linear":
        (w,) = weights
        return z @ w.mT
    w1, w2 = weights
    return z + F.silu(z @ w2.mT) @ w1.mT
