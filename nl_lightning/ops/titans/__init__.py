"""Titans neural long-term memory: surprise-with-momentum update plus forgetting (SPEC §2).

Implementations, all with one contract and the chunked semantics of ``naive.py``:

* ``naive``    - token-by-token reference (``naive_titans_memory``);
* ``chunk``    - chunk-parallel PyTorch (``chunk_titans_memory``);
* ``cpu_fused`` - the chunk loop as one C++ kernel on CPU (``cpu_fused_titans_memory``);
* ``compiled`` - the chunk step through ``torch.compile`` (``compiled_titans_memory``);
* ``triton``   - Triton kernels, linear memory only (``triton_linear_titans_memory``; needs
  CUDA, or ``TRITON_INTERPRET=1`` on CPU). Imported lazily so the package works without Triton;
* ``auto``     - ``cpu_fused`` where it applies (``cpu_extension.use_fused_kernel``), else ``chunk``.
"""

from __future__ import annotations

from torch import Tensor

from nl_lightning.ops.autocast import float32_under_autocast
from nl_lightning.ops.cpu_extension import use_fused_kernel

from .chunk import chunk_titans_memory
from .common import KINDS, MemoryState, Weights
from .cpu_fused import cpu_fused_titans_memory
from .fused import compiled_titans_memory
from .naive import naive_titans_memory

IMPLS = ("chunk", "naive", "compiled", "cpu_fused", "triton", "auto")

__all__ = [
    "IMPLS",
    "KINDS",
    "MemoryState",
    "chunk_titans_memory",
    "compiled_titans_memory",
    "cpu_fused_titans_memory",
    "naive_titans_memory",
    "titans_memory",
    "triton_linear_titans_memory",
]


def __getattr__(name: str):
    if name == "triton_linear_titans_memory":
        from .triton_linear import triton_linear_titans_memory

        return triton_linear_titans_memory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@float32_under_autocast
def titans_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Weights,
    *,
    kind: str = "linear",
    chunk_size: int = 64,
    state: MemoryState | None = None,
    impl: str = "chunk",
) -> tuple[Tensor, MemoryState]:
    """Run the Titans memory over a sequence and return ``(y, final_state)``.

    Args:
        q, k: ``(B, H, T, Dk)`` queries and keys; v: ``(B, H, T, Dv)`` values.
        theta, eta, alpha: ``(B, H, T)`` learning rate, momentum and forgetting gates in (0, 1).
        weights: initial (slow) weights shared across the batch: ``W`` / ``(W,)`` of shape
            ``(H, Dv, Dk)`` for ``kind="linear"``; ``(W1, W2)`` of shapes ``(H, Dv, Dh)``,
            ``(H, Dh, Dk)`` for ``kind="mlp"`` (``M(z) = z + W1 silu(W2 z)``, needs Dk == Dv).
        kind: ``"linear"`` or ``"mlp"``.
        chunk_size: tokens whose gradients share one chunk-start state (1 = online GD).
        state: per-batch state from a previous call; the memory continues from it instead of
            from ``weights``. Splitting a sequence on a chunk boundary gives the same result as
            one call.
        impl: ``"chunk"`` (default), ``"naive"``, ``"compiled"``, ``"cpu_fused"`` (CPU tensors) or
            ``"triton"`` (``kind="linear"``); ``"auto"`` (the models' default) is ``"cpu_fused"``
            where ``cpu_extension.use_fused_kernel`` allows it (CPU tensors, not traced, no
            dispatch mode, the extension builds) and ``"chunk"`` elsewhere.

    Returns:
        ``y: (B, H, T, Dv)`` read-outs ``y_t = M_t(q_t)`` and the final :class:`MemoryState`.
        Under ``torch.autocast`` the memory is a float32 operator: inputs of mixed or half
        precision are upcast and the outputs are float32 (``nl_lightning.ops.autocast``).
    """
    if impl == "auto":
        impl = "cpu_fused" if use_fused_kernel(q) else "chunk"
    if impl == "chunk":
        fn = chunk_titans_memory
    elif impl == "cpu_fused":
        fn = cpu_fused_titans_memory
    elif impl == "naive":
        fn = naive_titans_memory
    elif impl == "compiled":
        fn = compiled_titans_memory
    elif impl == "triton":
        try:
            from .triton_linear import triton_linear_titans_memory as fn
        except ImportError as err:
            raise ImportError(
                f"impl='triton' needs the triton package ({err}); install it (the dev extra pins "
                "a version matching torch) or use impl='chunk' / impl='compiled'."
            ) from err
    else:
        raise ValueError(f"impl={impl!r} is not a Titans memory implementation; use one of {IMPLS}.")
    return fn(q, k, v, theta, eta, alpha, weights, kind=kind, chunk_size=chunk_size, state=state)
