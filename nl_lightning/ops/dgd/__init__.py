"""HOPE's self-modifying memory updated with DGD (delta gradient descent), SPEC §2, or with the
normalised delta rule that stays bounded at one-shot step sizes.

Each token t writes into a memory M and reads it back:

    v̂_t = M_{t-1}(v_t)  (target="self")  or  v_t  (target="value")
    DGD:    W <- W (alpha_t I - eta_t x xᵀ) - eta_t grad_W ||M(k_t) - v̂_t||²     for each layer W, input x
    delta:  W <- W (alpha_t I - eta_l x xᵀ) + eta_l (y - g) xᵀ,  eta_l = beta_t / (||x||² + eps)
    o_t = M_t(q_t)                                       read after the update

``dgd_memory`` is the entry point; the implementations follow the op contract
(``ops/contract.py``) side by side: ``naive.py`` (the definition, with the delta rule's stability
bound), ``chunk.py``, ``compiled.py``, ``cpu.py`` + ``dgd_cpu.cpp`` (the MLP memory) and
``triton.py`` + ``triton_kernels.py`` (the MLP memory). They agree in forward and backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nl_lightning.ops import contract
from nl_lightning.ops.autocast import float32_under_autocast
from nl_lightning.ops.contract import MemoryState
from nl_lightning.ops.dgd.chunk import chunk_dgd_memory
from nl_lightning.ops.dgd.common import RULES, TARGETS, check_rule
from nl_lightning.ops.dgd.compiled import compiled_dgd_memory
from nl_lightning.ops.dgd.cpu import cpu_dgd_memory
from nl_lightning.ops.dgd.naive import naive_dgd_memory


IMPLEMENTED = ("naive", "chunk", "compiled", "cpu", "triton")
_FUNCTIONS = dict(naive=naive_dgd_memory, chunk=chunk_dgd_memory, compiled=compiled_dgd_memory, cpu=cpu_dgd_memory)  # triton: on use

__all__ = ["IMPLEMENTED", "RULES", "TARGETS", "MemoryState", "dgd_memory"]


@float32_under_autocast
def dgd_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    weights: Sequence[torch.Tensor] | None = None,
    *,
    kind: str,
    chunk_size: int,
    state: MemoryState | None = None,
    impl: str = "auto",
    rule: str = "dgd",
    target: str = "self",
) -> tuple[torch.Tensor, MemoryState]:
    """Run a DGD memory over a sequence.

    Args:
        q, k, v: (B, H, T, D) queries, keys and values.
        eta, alpha: (B, H, T) per-token step gate (DGD's learning rate η, the delta rule's
            fraction β of the error corrected) and retention, expected in (0, 1].
        weights: the memory's initial (slow, trainable) weights, one set per head and shared by the
            batch: ``(W,)`` with W (H, D, D) for ``kind="linear"``; ``(W1, W2)`` with
            W1 (H, D, Dh), W2 (H, Dh, D) for ``kind="mlp"``. Gradients flow into them.
        kind: ``"linear"`` (M(z) = W z) or ``"mlp"`` (M(z) = z + W1 silu(W2 z)).
        chunk_size: tokens whose targets and gradients are taken at their chunk-start state;
            1 is the exact online rule.
        state: the :class:`MemoryState` a previous call returned, to continue a sequence instead of
            starting from ``weights``. Give exactly one of the two.
        impl: one of the contract's implementations (``ops/contract.py``). ``"cpu"`` and
            ``"triton"`` are the MLP memory only; ``"triton"`` takes D, Dh and the chunk up to 64
            and, not yet timed on a GPU, is never picked by ``"auto"`` (``"cpu"`` where it applies,
            else ``"chunk"``).
        rule: ``"dgd"`` (the paper's rule) or ``"delta"`` (the layer-local normalised delta rule;
            ``naive.py`` states its bound).
        target: ``"self"`` (the memory's own target v̂ = M(v), the paper's) or ``"value"`` (v).

    Returns:
        o: (B, H, T, D) read-outs o_t = M_t(q_t); and the end :class:`MemoryState` (no momentum).
        Both in the input dtype, computed in float32 at least; under ``torch.autocast`` a float32
        operator (mixed or half inputs upcast, float32 outputs; ``nl_lightning.ops.autocast``).
    """
    contract.check_impl(impl, IMPLEMENTED, "dgd_memory")
    contract.check_kind(kind)
    check_rule(rule, target)
    contract.check_chunk_size(chunk_size)
    _, _, _, dk, dv = contract.check_sequence(q, k, v, {"eta": eta, "alpha": alpha})
    if dk != dv:
        raise ValueError(f"the DGD memory maps D to D; got keys of width {dk} and values of width {dv}.")
    start = contract.start_state(weights, state, kind, q, v, momentum=False)
    impl = contract.resolve_impl(impl, q, cpu_applies=kind == "mlp")
    function = contract.implementation("dgd", impl, _FUNCTIONS)
    return contract.full_precision(
        function, q, k, v, (eta, alpha), start, kind=kind, chunk_size=chunk_size, rule=rule, target=target
    )
