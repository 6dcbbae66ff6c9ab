"""HOPE's self-modifying memory updated with DGD (delta gradient descent), SPEC §2, or with the
normalised delta rule that stays bounded at one-shot step sizes.

Each token t writes into a memory M and reads it back:

    v̂_t = M_{t-1}(v_t)  (target="self")  or  v_t  (target="value")
    DGD:    W <- W (alpha_t I - eta_t x xᵀ) - eta_t grad_W ||M(k_t) - v̂_t||²     for each layer W, input x
    delta:  W <- W (alpha_t I - eta_l x xᵀ) + eta_l (y - g) xᵀ,  eta_l = beta_t / (||x||² + eps)
    o_t = M_t(q_t)                                       read after the update

(``naive.py`` has the definitions and the delta rule's stability bound.)

``naive.py`` is the token-by-token definition (including the chunked semantics), ``chunk.py`` the
chunk-parallel kernel, ``fused.py`` the compiled kernel, ``cpu_fused.py`` (C++) and
``triton_mlp.py`` (Triton) the MLP memory's chunk loop as one kernel each. They agree in forward
and backward.
``shared_key.py`` is the chunk kernel specialised to several memories written with one key, value
and gate stream whose read-outs are not needed (HOPE's projection memories; tested against naive).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nl_lightning.ops.autocast import float32_under_autocast
from nl_lightning.ops.dgd.chunk import chunk_dgd_memory
from nl_lightning.ops.dgd.common import KINDS, RULES, TARGETS, check_rule
from nl_lightning.ops.cpu_extension import use_fused_kernel
from nl_lightning.ops.dgd.cpu_fused import cpu_fused_dgd_memory
from nl_lightning.ops.dgd.fused import compiled_dgd_memory
from nl_lightning.ops.dgd.naive import naive_dgd_memory
from nl_lightning.ops.dgd.shared_key import shared_key_mlp_update

__all__ = ["RULES", "TARGETS", "dgd_memory", "dgd_shared_key_update"]

_IMPLS = {
    "chunk": chunk_dgd_memory,
    "naive": naive_dgd_memory,
    "compiled": compiled_dgd_memory,
    "cpu_fused": cpu_fused_dgd_memory,
}


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
    state: Sequence[torch.Tensor] | None = None,
    impl: str = "chunk",
    rule: str = "dgd",
    target: str = "self",
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
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
        state: per-batch weights to start from instead of ``weights`` (the state returned by a
            previous call, to continue a sequence): same layout with a leading B dimension.
            Give exactly one of ``weights`` and ``state``.
        impl: ``"chunk"`` (chunk-parallel), ``"naive"`` (token loop), ``"compiled"``
            (``torch.compile``d chunk steps), ``"cpu_fused"`` (the chunk loop as one C++ kernel,
            ``kind="mlp"`` on CPU; ``cpu_fused.py``), ``"triton"`` (the chunk loop as Triton
            kernels, ``kind="mlp"`` with D, Dh and the chunk at most 64, on CUDA or on CPU under
            ``TRITON_INTERPRET=1``; ``triton_mlp.py``; not yet timed on a GPU, so ``"auto"`` does
            not pick it) or ``"auto"``: ``"cpu_fused"`` where it applies and its extension builds,
            except while the ATen ops must be visible (``torch.compile`` tracing, a dispatch mode
            such as the FLOP counter; ``cpu_extension.use_fused_kernel``), else ``"chunk"``.
        rule: ``"dgd"`` (the paper's rule) or ``"delta"`` (the layer-local normalised delta rule;
            ``naive.py`` states its bound). ``"triton"`` implements ``"dgd"`` only and refuses the other.
        target: ``"self"`` (the memory's own target v̂ = M(v), the paper's) or ``"value"`` (v).

    Returns:
        o: (B, H, T, D) read-outs o_t = M_t(q_t); and the per-batch state after the last token.
        Both in the input dtype, computed in float32 at least; under ``torch.autocast`` a float32
        operator (mixed or half inputs upcast, float32 outputs; ``nl_lightning.ops.autocast``).
    """
    if impl not in _IMPLS and impl not in ("triton", "auto"):
        raise ValueError(f"impl={impl!r} is not one of {sorted([*_IMPLS, 'triton', 'auto'])}.")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(KINDS)}.")
    check_rule(rule, target)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (1 = exact online rule).")
    batch, heads, _, dim = _check_sequence(q, k, v, eta, alpha)
    if (weights is None) == (state is None):
        raise ValueError(
            "Give exactly one of `weights` (initial per-head weights) and `state` (per-batch state "
            f"returned by a previous call); got weights={'set' if weights is not None else None}, "
            f"state={'set' if state is not None else None}."
        )
    if state is None:
        weights = _check_weights(weights, kind, (heads,), dim, "weights", q)
        state = tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in weights)
    else:
        state = _check_weights(state, kind, (batch, heads), dim, "state", q)
    if impl == "auto":
        impl = _auto_impl(q, kind)
    return _run_in_full_precision(
        _impl(impl), q, k, v, eta, alpha, state, kind=kind, chunk_size=chunk_size, rule=rule, target=target
    )


def _impl(name: str):
    if name != "triton":
        return _IMPLS[name]
    try:  # imported on use: the triton package is optional (the dev extra pins it)
        from nl_lightning.ops.dgd.triton_mlp import triton_dgd_memory
    except ImportError as err:
        raise ImportError(
            f"impl='triton' needs the triton package ({err}); install it (the dev extra pins it) or use "
            "impl='chunk'."
        ) from err
    return triton_dgd_memory


def _auto_impl(q: torch.Tensor, kind: str) -> str:
    return "cpu_fused" if kind == "mlp" and use_fused_kernel(q) else "chunk"


@float32_under_autocast
def dgd_shared_key_update(
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    state: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """One chunk's DGD update of M MLP memories that all see the same keys, values and gates.

    The state ``dgd_memory(k', k', v', eta', alpha', state=state, kind="mlp", chunk_size=L)``
    returns when k', v', eta', alpha' repeat the shared inputs once per memory (every gradient at
    the chunk-start state), computed without the read-outs and with the key-only work done once
    (``shared_key.py``). HOPE's self-modifying projection memories use it.

    Args:
        k, v: (B, L, D) keys and values; eta, alpha: (B, L) gates in (0, 1).
        state: (W1, W2) with W1 (B, M, D, Dh), W2 (B, M, Dh, D): the memories at the chunk start.

    Returns:
        (W1, W2) after the L tokens, in the input dtype (float32 under ``torch.autocast``).
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be (B, L, D); got {tuple(k.shape)} and {tuple(v.shape)}.")
    for name, x in (("eta", eta), ("alpha", alpha)):
        if x.shape != k.shape[:2]:
            raise ValueError(f"{name} must be (B, L) = {tuple(k.shape[:2])}; got {tuple(x.shape)}.")
    batch, _, dim = k.shape
    state = tuple(state)
    if len(state) != KINDS["mlp"]:
        raise ValueError(f"state must be (W1, W2) of an mlp memory; got {len(state)} tensors.")
    w1, w2 = state
    memories, hidden = (w1.shape[1], w1.shape[3]) if w1.dim() == 4 else (0, 0)
    if w1.shape != (batch, memories, dim, hidden) or w2.shape != (batch, memories, hidden, dim):
        raise ValueError(
            f"state must be W1 (B, M, D, Dh), W2 (B, M, Dh, D) with B={batch}, D={dim}; "
            f"got {tuple(w1.shape)} and {tuple(w2.shape)}."
        )
    for name, x in (("v", v), ("eta", eta), ("alpha", alpha), ("state[0]", w1), ("state[1]", w2)):
        if x.dtype != k.dtype or x.device != k.device:
            raise ValueError(f"{name} is {x.dtype} on {x.device} but k is {k.dtype} on {k.device}; cast it to match.")
    dtype = k.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    inputs = (x.to(compute) for x in (k, v, eta, alpha))
    new_state = shared_key_mlp_update(*inputs, tuple(s.to(compute) for s in state))
    return tuple(s.to(dtype) for s in new_state)


def _run_in_full_precision(impl, q, k, v, eta, alpha, state, **options):
    """Run ``impl`` upcasting float16/bfloat16 inputs to float32 (under autocast the caller,
    ``dgd_memory``, has already upcast them and turned autocast off).

    The triangular solve has no half-precision kernel, and the state is a running sum over the
    sequence, so within a call it is kept in float32 at least (as flash-linear-attention does for
    its states); o and the final state come back in the input dtype.
    """
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v, eta, alpha = (x.to(compute) for x in (q, k, v, eta, alpha))
    o, state = impl(q, k, v, eta, alpha, tuple(s.to(compute) for s in state), **options)
    return o.to(dtype), tuple(s.to(dtype) for s in state)


def _check_sequence(q, k, v, eta, alpha):
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, T, D); got shape {tuple(q.shape)}.")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}; got {tuple(x.shape)}.")
    for name, x in (("eta", eta), ("alpha", alpha)):
        if x.shape != q.shape[:3]:
            raise ValueError(
                f"{name} must be (B, H, T) = {tuple(q.shape[:3])}, one scalar per token; "
                f"got {tuple(x.shape)}."
            )
    for name, x in (("k", k), ("v", v), ("eta", eta), ("alpha", alpha)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{name} is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}; cast all inputs to one."
            )
    return q.shape[0], q.shape[1], q.shape[2], q.shape[3]


def _check_weights(tensors, kind, lead, dim, name, q):
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    layout = "(W,)" if kind == "linear" else "(W1, W2)"
    if len(tensors) != KINDS[kind]:
        raise ValueError(f"{name} for kind={kind!r} must be {layout}; got {len(tensors)} tensors.")
    if kind == "linear":
        expected = [(*lead, dim, dim)]
    else:
        hidden = tensors[0].shape[-1] if tensors[0].dim() > 0 else 0  # Dh is read from W1
        expected = [(*lead, dim, hidden), (*lead, hidden, dim)]
    for i, (x, shape) in enumerate(zip(tensors, expected)):
        if tuple(x.shape) != shape:
            raise ValueError(
                f"{name}[{i}] of {layout} for kind={kind!r} must have shape {shape} "
                f"(leading dims {'(H,)' if name == 'weights' else '(B, H)'}); got {tuple(x.shape)}."
            )
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{name}[{i}] is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}; cast it to match."
            )
    return tensors
