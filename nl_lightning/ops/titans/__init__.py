"""Titans neural long-term memory: surprise-with-momentum update plus forgetting (SPEC §2).

``titans_memory`` is the entry point; the implementations follow the op contract
(``ops/contract.py``) side by side: ``naive.py`` (the definition), ``chunk.py``, ``compiled.py``,
``cpu.py`` + ``titans_cpu.cpp`` (both kinds) and ``triton.py`` (the linear memory).
"""

from __future__ import annotations

from torch import Tensor

from nl_lightning.ops import contract
from nl_lightning.ops.autocast import float32_under_autocast
from nl_lightning.ops.contract import KINDS, MemoryState, Weights
from nl_lightning.ops.titans.chunk import chunk_titans_memory
from nl_lightning.ops.titans.compiled import compiled_titans_memory
from nl_lightning.ops.titans.cpu import cpu_titans_memory
from nl_lightning.ops.titans.naive import naive_titans_memory


IMPLEMENTED = ("naive", "chunk", "compiled", "cpu", "triton")
_FUNCTIONS = dict(naive=naive_titans_memory, chunk=chunk_titans_memory, compiled=compiled_titans_memory, cpu=cpu_titans_memory)  # triton: on use

__all__ = ["IMPLEMENTED", "KINDS", "MemoryState", "titans_memory"]


@float32_under_autocast
def titans_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Weights | None = None,
    *,
    kind: str,
    chunk_size: int,
    state: MemoryState | None = None,
    impl: str = "auto",
) -> tuple[Tensor, MemoryState]:
    """Run the Titans memory over a sequence and return ``(y, end_state)``.

    For every token: ``S_t = eta_t S_{t-1} - theta_t grad ||M(k_t) - v_t||²`` (gradients at the
    chunk-start state), ``M_t = (1 - alpha_t) M_{t-1} + S_t``, ``y_t = M_t(q_t)`` (``naive.py``).

    Args:
        q, k: ``(B, H, T, Dk)`` queries and keys; v: ``(B, H, T, Dv)`` values.
        theta, eta, alpha: ``(B, H, T)`` learning rate, momentum and forgetting gates in (0, 1).
        weights: initial (slow, trainable) weights shared across the batch: ``(W,)`` of shape
            ``(H, Dv, Dk)`` for ``kind="linear"``; ``(W1, W2)`` of shapes ``(H, Dv, Dh)``,
            ``(H, Dh, Dk)`` for ``kind="mlp"`` (``M(z) = z + W1 silu(W2 z)``, needs Dk == Dv).
        kind: ``"linear"`` or ``"mlp"``.
        chunk_size: tokens whose gradients share one chunk-start state (1 = online GD).
        state: the :class:`MemoryState` a previous call returned, to continue a sequence instead of
            starting from ``weights``. Give exactly one of the two.
        impl: one of the contract's implementations (``ops/contract.py``); ``"triton"`` is the
            linear memory only; ``"auto"`` is ``"cpu"`` where it applies, else ``"chunk"``.

    Returns:
        ``y: (B, H, T, Dv)`` and the end :class:`MemoryState`, in the input dtype (computed in
        float32 at least). Under ``torch.autocast`` the memory is a float32 operator
        (``nl_lightning.ops.autocast``).
    """
    contract.check_impl(impl, IMPLEMENTED, "titans_memory")
    contract.check_kind(kind)
    contract.check_chunk_size(chunk_size)
    contract.check_sequence(q, k, v, {"theta": theta, "eta": eta, "alpha": alpha})
    start = contract.start_state(weights, state, kind, q, v, momentum=True)
    impl = contract.resolve_impl(impl, q)
    function = contract.implementation("titans", impl, _FUNCTIONS)
    return contract.full_precision(function, q, k, v, (theta, eta, alpha), start, kind=kind, chunk_size=chunk_size)
